"""BYOL's two augmented views, by job:

- views.py      ViewSpec, VIEW1 / VIEW2 (the official pair), views_from_config (a run's pair), sample_params
- pipelines.py  the DALI graphs as module-level pipeline functions (every random number drawn by DALI)
- crops.py      the CPU crops (torch's uint8 bicubic over DALI's windows)
- makers.py     one view maker per path: GPU, CPU threads, CPU processes (cpu_workers.py: the worker processes)
- loader.py     TwoViewLoader, the thin loader that runs a graph and hands its outputs to a maker
How the work runs (the CUDA chain, the decode mode, the decoder hints, the CPU chunk size, processes or threads) is
the run's AugmentConfig (fastbyol.config: each field a `fastbyol train` flag).
"""

from ..config import CPU_PARALLEL_MODES, DECODE_MODES, AugmentConfig
from .crops import crop_resize_flip, crop_resize_flip_many
from .loader import TwoViewLoader, dali_available
from .pipelines import decode_views, decoder_ops, draw_params, op_random_resized_crop, pack_params
from .views import IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2, ViewSpec, sample_params, views_from_config

__all__ = ["AugmentConfig", "CPU_PARALLEL_MODES", "DECODE_MODES", "IMAGENET_MEAN", "IMAGENET_STD", "VIEW1", "VIEW2",
           "TwoViewLoader", "ViewSpec", "crop_resize_flip", "crop_resize_flip_many", "dali_available", "decode_views",
           "decoder_ops", "draw_params", "op_random_resized_crop", "pack_params", "sample_params",
           "views_from_config"]
