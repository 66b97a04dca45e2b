"""The DALI graphs of the two views, as module-level pipeline functions with plain arguments (the way DALI's own
`@pipeline_def` examples write them); `build_pipeline` wraps one in `pipeline_def` and builds it. The loader that runs
them is fastbyol.augment.loader.

DALI draws every random number of both views: the crop windows (fn.random_crop_generator / the crop ops' own
sampler: area and log-aspect drawn until the window fits, 10 attempts), the flips, and the chain's parameters
(`draw_params`, packed per sample as one (N_PARAMS,) float32 output: columns in
fastbyol.augment.photometric.PARAM_NAMES).
Its checkpoint holds all their states and the read position, so DALI's checkpoint string is all a resume needs. The
graphs have ~40 operators (the colour chain built from DALI arithmetic had ~1,600). Each graph creates its operators
in one fixed order (reader or source, then view 1's draws and crop, then view 2's): keep it when editing a graph, so
a seed, and a saved checkpoint, go on giving the same batches.

The four graphs and their outputs, in order:
- gpu_arrays:  crops1, params1, crops2, params2 (uint8 (3, S, S) planar crops on the GPU; params on the GPU)
- gpu_files:   the same, decoded by the "mixed" decoder ("roi" or "once": decode_views)
- cpu_arrays:  index (the row of the array the source emitted), window1, params1, window2, params2
  (gpu_arrays with labels=True, the online probe's, adds that index as a last output)
- cpu_files:   images (decoded whole, (H, W, 3)), window1, params1, window2, params2
The files graphs with labels=True (the online probe's) add one last output, `labels` (int64 per sample, on the CPU:
the reader's label of each sample, in the order the reader emitted them). Its operators are made after every other
one and its output comes last, so the other operators keep their names and their order (every random draw stays the
same: tests/test_online_probe_files.py); a DALI checkpoint restores only into a graph with the same operators, so one
saved without labels has no state for the label's (the loader then builds the graph without them).
On the CPU the windows ((5,) int32 [y, x, h, w, flip]) are applied by torch (fastbyol.augment.crops): torch's uint8
bicubic is ~10x faster than DALI's CPU resize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import DECODE_MODES, AugmentConfig
from ..errors import FastByolError
from .photometric import ORDERS, PARAM_NAMES
from .views import ViewSpec

GPU_OUTPUTS = ("crops1", "params1", "crops2", "params2")
CPU_OUTPUTS = ("pixels", "window1", "params1", "window2", "params2")  # pixels: `index` (arrays) or `images` (files)


def op_random_resized_crop(images, spec: ViewSpec, size: int):
    """Random area in spec.crop_area, log-uniform aspect in spec.crop_aspect, bicubic resize to size x size without
    antialiasing (the official tf.image.resize(..., BICUBIC) has antialias=False; DALI's default filters when
    shrinking, which also costs more)."""
    from nvidia.dali import fn, types

    return fn.random_resized_crop(images, size=(size, size), random_area=list(spec.crop_area),
                                  random_aspect_ratio=list(spec.crop_aspect), interp_type=types.INTERP_CUBIC,
                                  antialias=False)


def draw_params(spec: ViewSpec) -> dict:
    """Every random number of one view, drawn per sample by DALI's random ops (so DALI's checkpoint holds their
    state); returned so tests can check their distributions. Coins are float 0/1 (flip: int32, as fn.flip wants);
    `order` is the jitter order, an index into fastbyol.augment.photometric.ORDERS drawn uniformly from the 24."""
    from nvidia.dali import fn, types

    def coin(p):  # coin_flip draws no floats: 0/1 as uint8, then float for the packed parameters
        return fn.cast(fn.random.coin_flip(probability=p, dtype=types.UINT8), dtype=types.FLOAT)

    return dict(
        flip=fn.random.coin_flip(probability=spec.flip_p, dtype=types.INT32),
        jitter=coin(spec.jitter_p),
        brightness=fn.random.uniform(range=[-spec.brightness, spec.brightness]),
        contrast=fn.random.uniform(range=[1.0 - spec.contrast, 1.0 + spec.contrast]),
        saturation=fn.random.uniform(range=[1.0 - spec.saturation, 1.0 + spec.saturation]),
        hue=fn.random.uniform(range=[-spec.hue, spec.hue]),
        order=fn.random.uniform(values=[float(k) for k in range(len(ORDERS))]),
        gray=coin(spec.gray_p),
        blur=coin(spec.blur_p),
        sigma=fn.random.uniform(range=list(spec.blur_sigma)),
        solarize=coin(spec.solarize_p),
    )


def pack_params(q: dict):
    """The photometric parameters of draw_params as one (N_PARAMS,) float32 per sample, columns in PARAM_NAMES."""
    from nvidia.dali import fn

    return fn.stack(*(q[name] for name in PARAM_NAMES))


def crop_and_params(images, spec: ViewSpec, size: int, cropped: bool = False):
    """CUDA: one view's geometric half: (flipped uint8 CHW crop size x size, (N_PARAMS,) float32 params).

    The crop leaves DALI planar (crop_mirror_normalize flips and transposes in one pass, at the cost of a flip): the
    chain works on planes, and transposing HWC in torch cost more than all four jitter ops but hue.
    cropped: the random crop was already taken while decoding (GPU JPEG path): only resize to size x size."""
    from nvidia.dali import fn, types

    q = draw_params(spec)
    if cropped:
        x = fn.resize(images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=False)
    else:
        x = op_random_resized_crop(images, spec, size)
    x = fn.crop_mirror_normalize(x, mirror=q["flip"], dtype=types.UINT8, output_layout="CHW")
    return x, pack_params(q)


def decoder_hints(device: str, hw_decoder_load: float, preallocate_side: int) -> dict:
    """The hardware-decoder arguments of a "mixed" decoder (none for the CPU decoder: they apply to "mixed" only).

    Sized for ImageNet-like data (most files ~500x375 or 375x500, ~100-150 KB), from the run's AugmentConfig:
    - hw_decoder_load: share of each batch given to the GPU's hardware JPEG engines (A100: 5, H100/H200: 7); the rest
      goes through nvJPEG's CUDA path, whose Huffman stage runs on DALI's CPU threads (files under
      hybrid_huffman_threshold, 1 Mpixel: all of ImageNet's common sizes) and whose kernels compete with the training
      step for the SMs. The engines cost neither CPU nor SM time, so they get most of the work: 0.9 (the default of
      fn.experimental.decoders) rather than fn.decoders' 0.65. The engines decode baseline JPEGs only: progressive
      files take the CUDA path whatever the share.
    - preallocate_side: the hardware decoder preallocates for a batch of side x side images up front (by our reading
      of nvjpegDecodeBatchedPreAllocate, ~batch x side^2 x 3 bytes; not measured); 512 covers both orientations of the
      common ImageNet sizes (256 x 512 x 512 x 3 = 200 MB at batch 256). A larger file only makes nvJPEG grow its
      buffer (a rare stall, not a failure); hints at ImageNet's largest file (DALI's ResNet-50 example uses
      5980 x 6430) would reserve ~30 GB at batch 256 by the same product.
    - device/host memory padding: DALI's defaults (16 MB device per thread, 8 MB pinned host x 2) already hold a
      500 x 375 image's buffers many times over; left as they are."""
    if device != "mixed":
        return {}
    return dict(hw_decoder_load=hw_decoder_load, preallocate_width_hint=preallocate_side,
                preallocate_height_hint=preallocate_side)


def decode_views(encoded, views, size: int, decode: str = "roi", device: str = "mixed", hw_decoder_load: float = 0.9,
                 preallocate_side: int = 512) -> list:
    """Both views' geometric half from encoded files: [(flipped uint8 CHW crop size x size, (N_PARAMS,) float32
    params)] per view in `views`. device: the decoders' backend, "mixed" in the CUDA graph; "cpu" runs the same graph
    on the CPU (tests: the crops, the sampler's distribution, checkpointing). decode:
    - "roi": one region-of-interest decode per view (fn.decoders.image_random_crop): each decode entropy-decodes the
      whole file (Huffman decoding cannot skip to a region) but runs the IDCT and colour conversion only inside the
      view's crop, so each JPEG is entropy-decoded twice;
    - "once": one whole-image decode (fn.decoders.image), then each view's random resized crop on the GPU from that
      one image (fn.random_resized_crop: the same window sampler as image_random_crop, then the same bicubic resize,
      flip and planar uint8 output). The decoder's output holds whole images (the ROI decoders' hold crops), so its
      output buffer is hinted at preallocate_side^2 x 3 bytes a sample, allocated before the first batch.
    "roi" stays the default (AugmentConfig.decode) until the GPU plan (benchmarks/gpu_plan.md, call 4's
    augment-jpeg-224-roi/-once items) has timed both on ImageNet-like JPEGs."""
    from nvidia.dali import fn, types

    if decode not in DECODE_MODES:
        raise FastByolError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    hints = decoder_hints(device, hw_decoder_load, preallocate_side)
    if decode == "once":
        x = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                              bytes_per_sample_hint=preallocate_side * preallocate_side * 3, **hints)
        return [crop_and_params(x, spec, size) for spec in views]
    out = []
    for spec in views:  # decoder then chain per view: the operators' order fixes their seeds (and the checkpoints)
        x = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                          random_area=list(spec.crop_area),
                                          random_aspect_ratio=list(spec.crop_aspect), **hints)
        out.append(crop_and_params(x, spec, size, cropped=True))
    return out


def crop_window_and_params(shape, spec: ViewSpec):
    """CPU: one view's crop window drawn by DALI, applied by torch (crop_resize_flip). Returns ((5,) int32
    [y, x, h, w, flip] per sample, (N_PARAMS,) float32 params). `shape`: each sample's (H, W) as an int64 node.

    fn.random_crop_generator is the window sampler of fn.random_resized_crop (same area and aspect ranges, same 10
    attempts and fallback), so the distribution is unchanged; only the resampling moved: DALI's CPU bicubic resize
    cost ~1 ms per 224 px crop on this project's 2-core machine, torch's uint8 one ~0.1 ms (and it runs on the
    chain's worker threads, beside DALI)."""
    from nvidia.dali import fn, types

    q = draw_params(spec)
    anchor, size = fn.random_crop_generator(shape, random_area=list(spec.crop_area),
                                            random_aspect_ratio=list(spec.crop_aspect))
    window = fn.cat(fn.cast(anchor, dtype=types.INT32), fn.cast(size, dtype=types.INT32),
                    fn.reshape(q["flip"], shape=[1]), axis=0)  # (5,) int32
    return window, pack_params(q)


# ------------------------------------------------------------------------------------------------- the four graphs
def gpu_arrays(source, views: tuple[ViewSpec, ViewSpec], size: int, labels: bool = False) -> tuple:
    """CUDA, a uint8 array: the source's (H, W, 3) images to the GPU, each view cropped and flipped there; labels:
    the rows the source emitted as a last (CPU) output (array_source)."""
    raw, index = array_source(source, labels)
    outs = []
    for spec in views:
        crop, params = crop_and_params(raw.gpu(), spec, size)
        outs += [crop, params.gpu()]
    return tuple(outs) + ((index,) if labels else ())


def array_source(source: "EpochSource", rows: bool):
    """The arrays' external source: (pixels (H, W, 3) uint8, None), or with `rows` (the online probe's), (pixels,
    the row index of each sample, int64 (1,)): the same operator with a second output, so every operator after it
    and every draw stay the same. `source` must have been made with_rows=rows."""
    from nvidia.dali import fn, types

    if not rows:
        return fn.external_source(source=source, batch=True, batch_info=True, layout="HWC", dtype=types.UINT8,
                                  no_copy=False), None
    pixels, index = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True, layout=["HWC", ""],
                                       dtype=[types.UINT8, types.INT64], no_copy=False)
    return pixels, index


def gpu_files(source, shard_id: int, num_shards: int, views: tuple[ViewSpec, ViewSpec], size: int,
              decoding: AugmentConfig, labels: bool = False) -> tuple:
    """CUDA, encoded files: this shard's files decoded by the "mixed" decoder as decoding.decode says, with its
    hardware-decoder hints (decode_views); labels: the reader's labels as a last (CPU) output."""
    encoded, raw = read_files(source, shard_id, num_shards, labels)
    outs = []
    for crop, params in decode_views(encoded, views, size, decoding.decode, "mixed", decoding.hw_decoder_load,
                                     decoding.preallocate_side):
        outs += [crop, params.gpu()]
    return tuple(outs) + ((source.dali_label(raw),) if labels else ())


def read_files(source, shard_id: int, num_shards: int, labels: bool) -> tuple:
    """The files graphs' reader: (encoded, raw label output or None). Without labels, the source's dali_reader (any
    encoded source); with them, its reader alone (dali_read), the label's operators made last (dali_label)."""
    if labels:
        return source.dali_read(shard_id, num_shards, name="reader", labels=True)
    return source.dali_reader(shard_id, num_shards, name="reader")[0], None


def cpu_arrays(source, image_shape: tuple[int, int], views: tuple[ViewSpec, ViewSpec]) -> tuple:
    """CPU, a uint8 array: DALI draws which rows (the source emits their indices) and every random number; torch
    crops the rows (they never enter DALI)."""
    from nvidia.dali import fn, types

    index = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.INT64)
    shape = fn.constant(idata=list(image_shape), dtype=types.INT64)
    outs = [index]
    for spec in views:
        outs += list(crop_window_and_params(shape, spec))
    return tuple(outs)


def cpu_files(source, shard_id: int, num_shards: int, views: tuple[ViewSpec, ViewSpec], labels: bool = False) -> tuple:
    """CPU, encoded files: decoded whole by DALI's CPU decoder; torch crops both views from each image. labels: the
    reader's labels as a last output."""
    from nvidia.dali import fn, types

    encoded, raw = read_files(source, shard_id, num_shards, labels)
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    shape = images.shape(dtype=types.INT64)[0:2]  # (H, W) of each image
    outs = [images]
    for spec in views:
        outs += list(crop_window_and_params(shape, spec))
    return tuple(outs) + ((source.dali_label(raw),) if labels else ())


@dataclass(frozen=True)
class DaliGraph:
    """One of the graphs above with its arguments, and the DALI pipeline settings it is built with."""

    fn: Callable[..., tuple]  # gpu_arrays, gpu_files, cpu_arrays or cpu_files
    args: tuple  # fn's arguments
    batch_size: int
    num_threads: int  # DALI's worker threads
    device_id: int | None  # the CUDA device; None: DALI on the CPU
    seed: int  # seed + shard_id: every shard draws its own augmentations


def build_pipeline(graph: DaliGraph, checkpoint: bytes | str | None):
    """`graph.fn(*graph.args)` as a built DALI pipeline, at `checkpoint` (None: from the seed). exec_dynamic: outputs
    are reference-counted, so torch can read them in place (DLPack, no copy) for as long as it holds them.
    Checkpointing: DALI serialises its RNG states (the crops' and every photometric parameter's) and its
    reader/source positions."""
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(graph.fn, enable_conditionals=False)(
        *graph.args, batch_size=graph.batch_size, num_threads=graph.num_threads, device_id=graph.device_id,
        seed=graph.seed, prefetch_queue_depth=2, exec_dynamic=True, enable_checkpointing=True, checkpoint=checkpoint)
    return build_quietly(pipe)


def build_quietly(pipe):
    """pipe.build(), with what native libraries print meanwhile captured and dropped (nvImageCodec's notes about
    optional extensions it could not load, e.g. under an address-space limit): a failed build raises DALI's error,
    which says what failed, and stderr keeps to fastbyol's one line."""
    from ..system.native import native_stderr

    with native_stderr():
        pipe.build()
    return pipe


def decoder_ops(pipe) -> int:
    """Image decoder operators of a built DALI pipeline (fn.decoders.image*: schema names Image, ImageRandomCrop,
    ImageCrop, ImageSlice); -1 if this DALI version does not expose its op list (the private `_ops`)."""
    ops = getattr(pipe, "_ops", None)
    if ops is None:
        return -1
    return sum(type(getattr(op, "_op", op)).__name__.startswith("Image") for op in ops)


def operator_count(pipe) -> int:
    """Operators in a built DALI graph (its size: the per-batch scheduling cost grows with it); -1 if this DALI
    version does not say (the count is read from the built pipeline's private op list)."""
    ops = getattr(pipe, "_ops", None)
    return len(ops) if ops is not None else -1


class EpochSource:
    """DALI external_source callback: one shuffled epoch of an array's rows, batch by batch, this shard's part only.

    The permutation depends on (seed, epoch) only, so every rank draws the same one and takes a disjoint slice.
    The last partial batch is dropped (every step sees a full batch; at most batch_size - 1 images a shard skip an
    epoch, a different subset each epoch). indices_only (CPU): emit each sample's row index (torch crops the row),
    not its pixels. with_rows (CUDA, the online probe's): emit (pixels, row indices), two outputs (array_source)."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, shard_id: int, num_shards: int,
                 indices_only: bool = False, with_rows: bool = False):
        self.images = images
        self.indices_only = indices_only
        self.with_rows = with_rows and not indices_only
        self.batch_size = batch_size
        self.seed = seed
        self.shard_id = shard_id
        self.per_shard = len(images) // num_shards
        self.steps_per_epoch = self.per_shard // batch_size
        self._perm_epoch = -1
        self._perm = None

    def __call__(self, info):
        epoch = info.epoch_idx  # restored by DALI checkpointing on resume
        if info.iteration >= self.steps_per_epoch:
            raise StopIteration
        if epoch != self._perm_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
            self._perm = perm[self.shard_id * self.per_shard:(self.shard_id + 1) * self.per_shard]
            self._perm_epoch = epoch
        idx = self._perm[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        if self.indices_only:
            return [np.array([i], dtype=np.int64) for i in idx]
        if self.with_rows:
            return [self.images[i] for i in idx], [np.array([i], dtype=np.int64) for i in idx]
        return [self.images[i] for i in idx]
