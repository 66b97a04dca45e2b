"""BYOL's two augmented views (see fastbyol.augment.loader's docstring)."""

from .crops import crop_resize_flip, crop_resize_flip_many
from .loader import (CPU_PARALLEL, CUDA_PHOTOMETRIC, DECODE, DECODE_MODES, HW_DECODER_LOAD, IMAGENET_MEAN, IMAGENET_STD,
                     PREALLOCATE_SIDE, VIEW1, VIEW2, TwoViewLoader, ViewSpec, dali_available, decode_views, decoder_ops,
                     draw_params, pack_params, sample_params)

__all__ = ["CPU_PARALLEL", "CUDA_PHOTOMETRIC", "DECODE", "DECODE_MODES", "HW_DECODER_LOAD", "IMAGENET_MEAN",
           "IMAGENET_STD", "PREALLOCATE_SIDE", "VIEW1", "VIEW2", "TwoViewLoader", "ViewSpec", "crop_resize_flip",
           "crop_resize_flip_many", "dali_available", "decode_views", "decoder_ops", "draw_params", "pack_params",
           "sample_params"]
