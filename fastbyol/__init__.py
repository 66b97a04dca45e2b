"""fastbyol: fast, correct BYOL pretraining (DALI views, compiled channels_last networks, fused Triton ops).

    make train                 # BYOL on the embedded Fashion-MNIST, prints kNN top-1 against random init
    fastbyol train --help      # the command line
    from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_   # the ops, for any trainer
    fastbyol.train(cfg, encoder=MyNet)  # BYOL on any nn.Module (docs/backbones.md)
"""

from .version import __version__  # noqa: F401


def __getattr__(name: str):
    """`fastbyol.train` without importing torch at `import fastbyol`: the training module, callable as `train`."""
    if name == "train":
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
