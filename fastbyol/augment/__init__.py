"""BYOL's two augmented views, by job:

- views.py      ViewSpec, VIEW1 / VIEW2 (the official pair), views_from_config (a run's pair), sample_params
- pipelines.py  the DALI graphs as module-level pipeline functions (every random number drawn by DALI)
- crops.py      the CPU crops (torch's uint8 bicubic over DALI's windows)
- makers.py     one view maker per path: GPU, CPU threads, CPU processes (cpu_workers.py: the worker processes)
- runner.py     the graph run batch after batch: its pipeline (a small protocol, so tests can pass their own),
                rebuilds at a checkpoint, native output, bad files replaced under --skip-bad-files
- loader.py     TwoViewLoader (LoaderSettings: batch, size, seed, device, threads, shard, views), the thin loader
                that runs a graph and hands its outputs to a maker
How the work runs (the CUDA chain's backend, the decode mode, the decoder hints, the CPU chunk size, processes or
threads) is the run's AugmentConfig (fastbyol.config: each field a `fastbyol train` flag).
"""

from .crops import crop_resize_flip, crop_resize_flip_many
from .loader import LoaderSettings, TwoViewLoader, dali_available
from .pipelines import decode_views, decoder_ops, draw_params, op_random_resized_crop, pack_params
from .runner import DaliPipeline, Pipeline
from .views import IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2, ViewSpec, sample_params, views_from_config

__all__ = ["DaliPipeline", "IMAGENET_MEAN", "IMAGENET_STD", "LoaderSettings", "Pipeline", "VIEW1", "VIEW2",
           "TwoViewLoader", "ViewSpec", "crop_resize_flip", "crop_resize_flip_many", "dali_available", "decode_views",
           "decoder_ops", "draw_params", "op_random_resized_crop", "pack_params", "sample_params",
           "views_from_config"]
