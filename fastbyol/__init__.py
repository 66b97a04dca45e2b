"""fastbyol: fast, correct BYOL pretraining (DALI views, compiled channels_last networks, fused Triton ops).

    make train                 # BYOL on the embedded Fashion-MNIST, prints kNN top-1 against random init
    fastbyol train --help      # the command line
    from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_   # the ops, for any trainer
    fastbyol.train(cfg, encoder=MyNet)  # BYOL on any nn.Module (docs/backbones.md)
    fastbyol.load_encoder(RUN_DIR or EXPORT)  # a trained encoder as a torch module (docs/evaluation.md)
"""

from .version import __version__  # noqa: F401


def __getattr__(name: str):
    """`fastbyol.train` and `fastbyol.load_encoder` without importing torch at `import fastbyol`: the training module
    (callable as `train`) and fastbyol.evaluation.encoders.load_encoder, imported when first asked for."""
    import importlib

    if name == "train":
        return importlib.import_module(".train", __name__)
    if name == "load_encoder":
        return importlib.import_module(".evaluation.encoders", __name__).load_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
