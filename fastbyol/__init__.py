"""fastbyol: fast, correct BYOL pretraining (DALI views, compiled channels_last networks, fused Triton ops).

    make train                 # BYOL on the embedded Fashion-MNIST, prints kNN top-1 against random init
    fastbyol train --help      # the command line
    from fastbyol.kernels import byol_loss, byol_loss_symmetric, ema_update_   # the ops, for any trainer
"""

__version__ = "0.1.0"
