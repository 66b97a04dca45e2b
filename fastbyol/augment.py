"""BYOL's two augmented views: NVIDIA DALI reads, decodes and draws every random number; the crops and the
photometric chain run as few whole-batch computations.

`ViewSpec` holds the parameters of one view (official `byol/utils/augmentations.py`; shared DESIGN.md's table),
`VIEW1` and `VIEW2` are the official pair, and `TwoViewLoader` yields both views as torch tensors (B, 3, S, S),
channels_last, normalized (float32 on the CPU, float16 on CUDA). Every image draws its own random parameters (crop,
flip, jitter factors and order, coins): DALI's random ops draw per sample, never one crop per batch.

Where each step runs:
- DALI draws every random number of both views: the crop windows (fn.random_crop_generator / the crop ops'
  own sampler: area and log-aspect drawn until the window fits, 10 attempts), the flips, and the chain's parameters
  (`draw_params`, packed per sample as one (N_PARAMS,) float32 output: columns in fastbyol.photometric.PARAM_NAMES).
  Its checkpoint holds all their states and the read position, so `state()` (DALI's checkpoint string) is all a
  resume needs. The graph has ~40 operators (the colour chain built from DALI arithmetic had ~1,600).
- CUDA: DALI also decodes (the mixed decoder; `decode` "roi": one ROI decode per view, "once": one whole decode
  and both views cropped from it, see DECODE_MODES), resizes (bicubic), flips and emits planar uint8 crops; the chain
  runs as CUDA_PHOTOMETRIC says.
- CPU: DALI reads and decodes files (arrays are rows the source names by index); torch crops, resizes and flips
  (`crop_resize_flip`: torch's uint8 bicubic is ~10x faster than DALI's CPU resize) and runs the chain
  (fastbyol.photometric.photometric). Array sources: in `num_threads` forked worker processes, one batch ahead
  (`cpu_parallel="processes"`, the default: fastbyol.cpu_workers; the chain's small ops hold the GIL, so threads
  mostly wait for each other); encoded files (or cpu_parallel="threads"): on `num_threads` worker threads. Both give
  the same batches, bit for bit.
The chain: colour jitter with p 0.8 (the four ops in the image's own random order, a clip after each) -> grayscale ->
blur -> solarize -> clip -> normalize -> channels_last, on [0, 1] floats, with contrast around each channel's mean
and saturation and hue in true HSV (tests/test_fidelity.py checks each op against a numpy port of the official op,
the whole chain on the loader's own draws, each probability and parameter range, and the crops' area and aspect).

Deviations left, and why:
- the crop window is drawn by DALI's sampler, the official by TF's sample_distorted_bounding_box (the same scheme,
  10 attempts; TF also asks the window to cover 10% of the image, min_object_covered=0.1);
- the crops are rounded to uint8 (<= 0.5/255) before the float ops (the official resize outputs floats);
- CUDA: DALI's bicubic filter may use another cubic coefficient than TF's Keys a = -0.5;
- CPU: torch's uint8 bicubic is TF's (Keys a = -0.5, half-pixel centres; tested within one level when enlarging)
  but antialiases when shrinking (TF does not), and rounds to uint8 between its two passes (it differs from a float
  resize only where the first pass overshoots [0, 255], at pixel-level edges).
(The blur now pads with zeros, as the official depthwise convolution: DALI's gaussian_blur reflected the borders.)
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .config import BLUR_WINDOW_RULES
from .errors import FastByolError
from .native import fold, native_stderr
from .crops import crop_resize_flip, crop_resize_flip_many  # noqa: F401  (re-exported: fastbyol.augment's API)
from .photometric import ORDERS, PARAM_NAMES, TAP_TAIL, photometric_many
from .photometric_variants import photometric_variant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation; probabilities in [0, 1], colour amounts in units of the [0, 1] pixel range."""

    crop_area: tuple[float, float] = (0.08, 1.0)  # fraction of the image area kept by the random crop
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # width / height, drawn log-uniformly
    flip_p: float = 0.5  # horizontal flip
    jitter_p: float = 0.8  # colour jitter, all four ops together
    brightness: float = 0.4  # additive delta ~ U[-b, b]
    contrast: float = 0.4  # factor ~ U[1 - c, 1 + c] around the image mean
    saturation: float = 0.2  # factor ~ U[1 - s, 1 + s]
    hue: float = 0.1  # delta ~ U[-h, h] of a full turn
    gray_p: float = 0.2  # grayscale
    blur_p: float = 1.0  # Gaussian blur
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U[lo, hi], in pixels
    blur_kernel_fraction: float = 0.1  # kernel side = 10% of the output side (radius = side // 10 // 2)
    solarize_p: float = 0.0  # solarize
    solarize_threshold: float = 0.5  # pixels >= threshold become 1 - x
    blur_window_rule: str = "official"  # "official" (10% of the side) or "cover" (also >= +-3 sigma_hi): blur_window

    def validate(self, name: str = "view") -> None:
        for field in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "solarize_threshold"):
            v = getattr(self, field)
            if not 0.0 <= v <= 1.0:
                raise FastByolError(f"{name}.{field} must be in [0, 1], got {v}")
        lo, hi = self.crop_area
        if not 0.0 < lo <= hi <= 1.0:
            raise FastByolError(f"{name}.crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise FastByolError(f"{name}.blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if self.blur_window_rule not in BLUR_WINDOW_RULES:
            raise FastByolError(f"{name}.blur_window_rule must be one of {', '.join(BLUR_WINDOW_RULES)}, got "
                                f"{self.blur_window_rule!r}")

    def blur_window(self, size: int) -> int:
        """Odd kernel side for an output side `size`.
        official: 10% of the side, as the official code: 23 taps at 224 px, 9 at 96, 3 at 28/32.
        cover: the official window, widened where it would cut the Gaussian of the widest sigma drawn short of
          +-3 sigma: max(official, 2 ceil(3 sigma_hi) + 1), that is 13 taps for sigma_hi = 2 up to 139 px, and the
          official window above (23 at 224 px: the same op there). At 28 px the official 3 taps turn a sigma of 2 px
          into a 3-tap box-like filter; the cover window is the Gaussian blur the recipe names."""
        official = 2 * (int(size * self.blur_kernel_fraction) // 2) + 1
        if self.blur_window_rule == "cover":
            return max(official, 2 * math.ceil(3 * self.blur_sigma[1]) + 1)
        return official

    def to_dict(self) -> dict:
        return asdict(self)


VIEW1 = ViewSpec(blur_p=1.0, solarize_p=0.0)
VIEW2 = ViewSpec(blur_p=0.1, solarize_p=0.2)


# One switch: the photometric chain the loader runs on CUDA tensors. "triton" (fastbyol.kernels.photometric: 4 launches
# per view, the per-image order handled inside the kernel) until the GPU plan has timed it against "compiled"
# (torch.compile of photometric_by_slot) and "reference" (photometric, eager): `fastbyol.augment_bench
# .bench_photometric` times all three. On the CPU the loader always runs the reference (`photometric`).
CUDA_PHOTOMETRIC = "triton"


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
    `order` is the jitter order, an index into fastbyol.photometric.ORDERS drawn uniformly from the 24."""
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


def sample_params(spec: ViewSpec, n: int, generator: torch.Generator | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """(n, N_PARAMS) float32 parameters with draw_params' distribution, drawn by torch: for tests and benchmarks of
    the photometric chain alone (the loader draws them with DALI)."""

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def coin(p):
        return (torch.rand(n, generator=generator) < p).float()

    cols = dict(jitter=coin(spec.jitter_p), brightness=u(-spec.brightness, spec.brightness),
                contrast=u(1 - spec.contrast, 1 + spec.contrast),
                saturation=u(1 - spec.saturation, 1 + spec.saturation), hue=u(-spec.hue, spec.hue),
                order=torch.randint(0, len(ORDERS), (n,), generator=generator).float(),
                gray=coin(spec.gray_p), blur=coin(spec.blur_p), sigma=u(*spec.blur_sigma),
                solarize=coin(spec.solarize_p))
    return torch.stack([cols[name] for name in PARAM_NAMES], dim=1).to(device)


def _crop_and_params(images, spec: ViewSpec, size: int, cropped: bool = False):
    """CUDA: DALI graph of one view's geometric half: (flipped uint8 CHW crop size x size, (N_PARAMS,) float32
    params).

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


# The CUDA JPEG path's decode mode (TwoViewLoader(decode=...), bench_augment(decode=...)):
# - "roi": one region-of-interest decode per view (fn.decoders.image_random_crop): each decode entropy-decodes the
#   whole file (Huffman decoding cannot skip to a region) but runs the IDCT and colour conversion only inside the
#   view's crop, so each JPEG is entropy-decoded twice;
# - "once": one whole-image decode (fn.decoders.image), then each view's random resized crop on the GPU from that
#   one image (fn.random_resized_crop: the same window sampler as image_random_crop, area and log-aspect drawn until
#   the window fits, 10 attempts, then the same bicubic resize, flip and planar uint8 output).
# "roi" stays the default until the GPU plan (benchmarks/gpu_plan.md, call 4's augment-jpeg-224-roi/-once items) has
# timed both on ImageNet-like JPEGs; the faster becomes the default. On the CPU the loader always decodes each file
# once and torch crops both views from it, so the mode changes nothing there.
DECODE_MODES = ("roi", "once")
DECODE = "roi"
CPU_PARALLEL = ("processes", "threads")  # how the CPU path spreads an array batch's pixel work (fastbyol.cpu_workers)

# Hints of the "mixed" decoders, sized for ImageNet-like data (most files ~500x375 or 375x500, ~100-150 KB):
# - HW_DECODER_LOAD: share of each batch given to the GPU's hardware JPEG engines (A100: 5, H100/H200: 7); the rest
#   goes through nvJPEG's CUDA path, whose Huffman stage runs on DALI's CPU threads (files under
#   hybrid_huffman_threshold, 1 Mpixel: all of ImageNet's common sizes) and whose kernels compete with the training
#   step for the SMs. The engines cost neither CPU nor SM time, so they get most of the work: 0.9 (the default of
#   fn.experimental.decoders) rather than fn.decoders' 0.65, which leaves a third of each batch to the CPU threads.
#   The engines decode baseline JPEGs only: progressive files take the CUDA path whatever the share.
# - PREALLOCATE_SIDE: the hardware decoder preallocates for a batch of width x height images up front (by our
#   reading of nvjpegDecodeBatchedPreAllocate, ~batch x width x height x 3 bytes; not measured); 512 x 512 covers
#   both orientations of the common ImageNet sizes (256 x 512 x 512 x 3 = 200 MB at batch 256). A larger file only
#   makes nvJPEG grow its buffer (a rare stall, not a failure); hints at ImageNet's largest file (DALI's ResNet-50
#   example uses 5980 x 6430) would reserve ~30 GB at batch 256 by the same product.
# - device/host memory padding: DALI's defaults (16 MB device per thread, 8 MB pinned host x 2) already hold a
#   500 x 375 image's buffers many times over; left as they are.
# - "once" only: the decoder's output holds whole images (the ROI decoders' hold crops), so its output buffer is
#   hinted at PREALLOCATE_SIDE^2 x 3 bytes a sample, allocated before the first batch rather than grown by it.
HW_DECODER_LOAD = 0.9
PREALLOCATE_SIDE = 512


def _decoder_hints(device: str) -> dict:
    """The hardware-decoder arguments of a "mixed" decoder (none for the CPU decoder: they apply to "mixed" only)."""
    if device != "mixed":
        return {}
    return dict(hw_decoder_load=HW_DECODER_LOAD, preallocate_width_hint=PREALLOCATE_SIDE,
                preallocate_height_hint=PREALLOCATE_SIDE)


def decode_views(encoded, views, size: int, decode: str = DECODE, device: str = "mixed") -> list:
    """DALI graph of both views' geometric half from encoded files: [(flipped uint8 CHW crop size x size, (N_PARAMS,)
    float32 params)] per view in `views`. decode: "roi" (one ROI decode per view) or "once" (one whole-image decode,
    both views cropped from it; see DECODE_MODES). device: the decoders' backend, "mixed" in the loader's CUDA graph;
    "cpu" runs the same graph on the CPU (tests: the crops, the sampler's distribution, checkpointing)."""
    from nvidia.dali import fn, types

    if decode not in DECODE_MODES:
        raise FastByolError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    hints = _decoder_hints(device)
    if decode == "once":
        x = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                              bytes_per_sample_hint=PREALLOCATE_SIDE * PREALLOCATE_SIDE * 3, **hints)
        return [_crop_and_params(x, spec, size) for spec in views]
    out = []
    for spec in views:  # decoder then chain per view: the order (and so the seeds) of the graph before the switch
        x = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                          random_area=list(spec.crop_area),
                                          random_aspect_ratio=list(spec.crop_aspect), **hints)
        out.append(_crop_and_params(x, spec, size, cropped=True))
    return out


def decoder_ops(pipe) -> int:
    """Image decoder operators of a built DALI pipeline (fn.decoders.image*: schema names Image, ImageRandomCrop,
    ImageCrop, ImageSlice); -1 if this DALI version does not expose its op list (the private `_ops`)."""
    ops = getattr(pipe, "_ops", None)
    if ops is None:
        return -1
    return sum(type(getattr(op, "_op", op)).__name__.startswith("Image") for op in ops)


def _crop_window_and_params(shape, spec: ViewSpec):
    """CPU: one view's crop window drawn by DALI, applied by torch (crop_resize_flip). Returns ((5,) int32
    [y, x, h, w, flip] per sample, (N_PARAMS,) float32 params). `shape`: each sample's (H, W) as an int64 node.

    fn.random_crop_generator is the window sampler of fn.random_resized_crop (same area and aspect ranges, same 10
    attempts and fallback), so the distribution is unchanged; only the resampling moved: DALI's CPU bicubic resize
    cost ~1 ms per 224 px crop on this 2-core machine, torch's uint8 one ~0.1 ms (and it runs on the chain's
    worker threads, beside DALI)."""
    from nvidia.dali import fn, types

    q = draw_params(spec)
    anchor, size = fn.random_crop_generator(shape, random_area=list(spec.crop_area),
                                            random_aspect_ratio=list(spec.crop_aspect))
    window = fn.cat(fn.cast(anchor, dtype=types.INT32), fn.cast(size, dtype=types.INT32),
                    fn.reshape(q["flip"], shape=[1]), axis=0)  # (5,) int32
    return window, pack_params(q)


class _EpochSource:
    """DALI external_source callback: one shuffled epoch of `images`, batch by batch, this shard's part only.

    The permutation depends on (seed, epoch) only, so every rank draws the same one and takes a disjoint slice.
    The last partial batch is dropped (every step sees a full batch; at most batch_size - 1 images a shard skip an
    epoch, a different subset each epoch).
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, shard_id: int, num_shards: int,
                 labels: np.ndarray | None = None, indices_only: bool = False):
        self.images = images
        self.labels = labels
        self.indices_only = indices_only  # CPU: emit each sample's index (torch crops the image), not its pixels
        self.batch_size = batch_size
        self.seed = seed
        self.shard_id = shard_id
        self.num_shards = num_shards
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
        if self.labels is None:
            return [self.images[i] for i in idx]
        return [self.images[i] for i in idx], [self.labels[i:i + 1] for i in idx]


def _dali_reason(text: str) -> str:
    """DALI's decode error in one short line: its first line (the decoder's own lines are context)."""
    return text.strip().splitlines()[0][:300] if text.strip() else "no message"


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class TwoViewLoader:
    """Iterate epochs of (view1, view2): each (B, 3, S, S) channels_last, normalized, on `device`; with labels (an
    array for array sources, or an encoded source's labels) each batch is (view1, view2, labels (B,) int64).

    Views are float32 on the CPU (the CPU trainer's dtype: no conversion, and the CPU has no fast fp16 arithmetic)
    and float16 on CUDA. Each is a fresh torch tensor (the chain's output), never a view of DALI's memory.

    source: a uint8 (N, H, W, 3) array (fed by external_source), or an encoded-file source (anything with
    `dali_reader(shard_id, num_shards, name)`, `len()`, `labels`, `where`: fastbyol.data's FileList or tar shards;
    a bare object with a `files` list and `labels` is read by readers.file). device "cpu" runs DALI with
    device_id=None and the chain with torch on the CPU; "cuda" decodes on the GPU (the "mixed" decoder) and runs the
    chain as CUDA_PHOTOMETRIC says.

    decode: how the CUDA path decodes encoded files (DECODE_MODES): "roi" takes each view's random crop during its
    own decode (two decodes a file), "once" decodes each file once and crops both views from it on the GPU. Arrays
    and the CPU path are unaffected (the CPU path always decodes once).
    """

    def __init__(
        self,
        images,
        batch_size: int,
        image_size: int,
        seed: int = 0,
        device: str = "cpu",
        num_threads: int = 2,
        view1: ViewSpec = VIEW1,
        view2: ViewSpec = VIEW2,
        shard_id: int = 0,
        num_shards: int = 1,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        gray_input: bool = False,
        checkpoint: bytes | str | None = None,
        labels: np.ndarray | None = None,
        decode: str = DECODE,
        cpu_parallel: str = "processes",
    ):
        if decode not in DECODE_MODES:
            raise FastByolError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.decode = decode
        if cpu_parallel not in CPU_PARALLEL:
            raise FastByolError(f"cpu_parallel must be one of {', '.join(CPU_PARALLEL)}, got {cpu_parallel!r}")
        if not dali_available():
            raise FastByolError("NVIDIA DALI is not installed: pip install 'fastbyol[cuda13]' (or [cuda12])")
        view1.validate("view1")
        view2.validate("view2")
        self.encoded = hasattr(images, "dali_reader") or hasattr(images, "files")
        self.encoded_source = images if self.encoded else None
        if self.encoded and labels is not None:
            raise FastByolError("labels= is for image arrays: an encoded source brings its own (source.labels)")
        self.file_labels = getattr(images, "labels", None) if self.encoded else labels
        self.with_labels = self.file_labels is not None
        if self.encoded:
            self.source = None
            per_shard = len(images.files if not hasattr(images, "dali_reader") else images) // num_shards
            self._steps = per_shard // batch_size
        else:
            if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 \
                    or images.dtype != np.uint8:
                got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
                raise FastByolError(f"images must be uint8 (N, H, W, 3), got {got}")
            with warnings.catch_warnings():  # a read-only array (a memory map) is fine: the loader never writes it
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self.images = torch.from_numpy(images)  # (N, H, W, 3) uint8, shared with the caller's array
            self.labels_t = None if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
            self.source = _EpochSource(images, batch_size, seed, shard_id, num_shards,
                                       None if labels is None else np.asarray(labels, dtype=np.int64),
                                       indices_only=not device.startswith("cuda"))
            per_shard, self._steps = self.source.per_shard, self.source.steps_per_epoch
        if self._steps == 0:
            raise FastByolError(f"batch size {batch_size} is larger than the {per_shard} images of "
                                "this shard: lower --batch-size")
        self.shard_id, self.num_shards = shard_id, num_shards
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_threads = num_threads
        self.device = device
        self.on_gpu = device.startswith("cuda")
        self.gray_input = gray_input
        self._checkpoint = checkpoint
        self._in_flight: collections.deque = collections.deque()  # CUDA: (DALI outputs, event after their chain)
        self.photometric_variant = CUDA_PHOTOMETRIC if self.on_gpu else "reference"
        self._chains = tuple(self._chain(spec, image_size, mean, std, num_threads) for spec in (view1, view2))
        self._build_args = (image_size, seed + shard_id, num_threads, view1, view2)
        # --skip-bad-files in the training pipeline: a source that can stand another file in for one DALI cannot
        # decode (replace_bad) and says it may (skip_bad); see _run.
        self.skip_bad = self.encoded and bool(getattr(images, "skip_bad", False)) and hasattr(images, "replace_bad")
        self.skipped: list[tuple[str, str]] = []  # (file or shard:offset:member, DALI's reason) replaced so far
        self.on_skip = None  # called with (name, reason) after each replacement (the trainer logs it)
        # CPU arrays: the pixel work in forked processes (fastbyol.cpu_workers), forked before DALI starts threads
        self.cpu_parallel = cpu_parallel if not (self.on_gpu or self.encoded) else "threads"
        self._procs = None
        self._ahead = None  # (epoch iterator, checkpoint before the oldest batch drawn, not yielded) (_epoch_ahead)
        self._owner = None  # the epoch iterator of the processes path that may run
        if self.cpu_parallel == "processes":
            from .cpu_workers import ChainProcesses

            self._procs = ChainProcesses(self.images, num_threads, batch_size, image_size,
                                         1 if gray_input else 3, self._chains)
        self._pipe = self._build(*self._build_args)

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    @property
    def operators(self) -> int:
        """Operators in the DALI graph (its size: the per-batch scheduling cost grows with it); -1 if this DALI
        version does not say (the count is read from the built pipeline's private op list)."""
        ops = getattr(self._pipe, "_ops", None)
        return len(ops) if ops is not None else -1

    @property
    def decoders(self) -> int:
        """Image decoders in the DALI graph (CUDA JPEG path: 2 for decode "roi", 1 for "once"; CPU files: 1;
        arrays: 0); -1 if this DALI version does not say (read as `operators` is)."""
        return decoder_ops(self._pipe)

    def _chain(self, spec: ViewSpec, size: int, mean, std, num_threads: int) -> dict:
        """The photometric chain's arguments for one view (all but crops and params)."""
        kwargs = dict(blur_window=spec.blur_window(size), solarize_threshold=spec.solarize_threshold,
                      mean=tuple(mean), std=tuple(std), gray_input=self.gray_input,
                      out_dtype=torch.float16 if self.on_gpu else torch.float32)
        if not self.on_gpu:  # blur taps below float32 resolution skipped (photometric's docstring)
            kwargs["blur_tail"] = TAP_TAIL
        return kwargs

    def _build(self, size, seed, num_threads, view1, view2):
        from nvidia.dali import fn, pipeline_def, types

        device_id = torch.cuda.current_device() if self.on_gpu else None
        on_gpu = self.on_gpu
        source = self.encoded_source

        def read():
            """(encoded bytes, int64 label or None) of this shard, reshuffled every epoch."""
            if hasattr(source, "dali_reader"):
                return source.dali_reader(self.shard_id, self.num_shards, name="reader")
            labels = None if self.file_labels is None else [int(v) for v in self.file_labels]
            encoded, label = fn.readers.file(files=source.files, labels=labels, shard_id=self.shard_id,
                                             num_shards=self.num_shards, shuffle_after_epoch=True, name="reader")
            return encoded, (None if labels is None else fn.cast(label, dtype=types.INT64))

        names: list[str] = []  # the pipeline's outputs, in order (filled when the graph is defined)

        @pipeline_def(enable_conditionals=False)
        def byol_two_views():
            outs: dict = {}
            label = None
            if source is not None:
                encoded, label = read()
                if on_gpu:  # "roi": each view decodes its own random crop; "once": one decode, two GPU crops
                    for v, (crop, params) in enumerate(decode_views(encoded, (view1, view2), size, self.decode), 1):
                        outs.update({f"crops{v}": crop, f"params{v}": params.gpu()})
                else:  # decoded whole; torch crops both views from it
                    x = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
                    outs["images"] = x
                    shape = x.shape(dtype=types.INT64)[0:2]  # (H, W) of each image
            elif on_gpu:
                if self.with_labels:
                    raw, label = fn.external_source(source=self.source, num_outputs=2, batch=True, batch_info=True,
                                                    layout=["HWC", ""], dtype=[types.UINT8, types.INT64])
                else:
                    raw = fn.external_source(source=self.source, batch=True, batch_info=True, layout="HWC",
                                             dtype=types.UINT8, no_copy=False)
                for v, spec in ((1, view1), (2, view2)):
                    crop, params = _crop_and_params(raw.gpu(), spec, size)
                    outs.update({f"crops{v}": crop, f"params{v}": params.gpu()})
            else:  # CPU arrays: DALI draws which images (by index) and every random number; torch does the pixels
                outs["index"] = fn.external_source(source=self.source, batch=True, batch_info=True,
                                                   dtype=types.INT64)
                shape = fn.constant(idata=list(self.images.shape[1:3]), dtype=types.INT64)
            if not on_gpu:
                for v, spec in ((1, view1), (2, view2)):
                    window, params = _crop_window_and_params(shape, spec)
                    outs.update({f"window{v}": window, f"params{v}": params})
            if label is not None:
                outs["labels"] = label
            names[:] = list(outs)
            return tuple(outs.values())

        # exec_dynamic: outputs are reference-counted, so torch can read them in place (DLPack, no copy) for as long
        # as it holds them. Checkpointing: DALI serialises its RNG states (the crops' and every photometric
        # parameter's) and its reader/source positions (see state()).
        pipe = byol_two_views(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                              prefetch_queue_depth=2, exec_dynamic=True, enable_checkpointing=True,
                              checkpoint=self._checkpoint)
        pipe.build()
        self._names = names
        return pipe

    def state(self) -> bytes | str:
        """The pipeline's position (epoch, iteration) and every random state, as DALI's checkpoint string: a loader
        built with checkpoint=state() yields exactly the batches this one would have yielded next. (While the CPU
        workers compute a batch ahead, that is the checkpoint taken before DALI drew it.)"""
        return self._ahead[1] if self._ahead is not None else self._pipe.checkpoint()

    def _run(self):
        """One batch of DALI outputs. CUDA: bound to torch's current stream (DALI makes them ready there, instead
        of blocking the host until they are).

        A file that passed the header checks but does not decode ends the run with one FastByolError naming it, or,
        when the source skips bad files, is replaced: the source stands another good file in for it (its list keeps
        its length and order, so positions, epochs, shards and DALI's checkpoint stay valid), the pipeline is
        rebuilt from DALI's checkpoint taken just before this batch (DALI 2.4 raises a decode error at the run()
        of the very batch that holds the file, and a pipeline that raised is no longer usable), and the batch is
        run again. The checkpoint before each run() is taken only then (~0.1 ms a batch, measured on the CPU)."""
        while True:
            before = self._pipe.checkpoint() if self.skip_bad else None
            try:
                with native_stderr() as printed:  # libjpeg/libpng/DALI messages: folded into ours, never printed
                    return self._pipe.run(torch.cuda.current_stream()) if self.on_gpu else self._pipe.run()
            except RuntimeError as e:  # a file that passed the header checks but does not decode
                if not self.encoded:
                    raise
                from .data.decode import failed_sample

                bad = failed_sample(self.encoded_source, str(e))
                reason = fold(f"does not decode (DALI: {_dali_reason(str(e))})", printed)
                if bad is not None and self.skip_bad and self.encoded_source.replace_bad(bad):
                    self.skipped.append((bad, reason))
                    if self.on_skip is not None:
                        self.on_skip(bad, reason)
                    self._rebuild(before)
                    continue
                if bad is not None:
                    raise FastByolError(f"{bad}: {reason}") from None
                where = getattr(self.encoded_source, "where", None) or "the encoded source"
                raise FastByolError(f"DALI failed on a batch of {where}: {str(e).splitlines()[0]}") from None

    def _rebuild(self, checkpoint) -> None:
        """A fresh pipeline at DALI checkpoint `checkpoint` (the one that raised is no longer valid)."""
        while self._in_flight:  # CUDA: the chain's kernels still reading the old pipeline's buffers
            self._in_flight.popleft()[1].synchronize()
        self._pipe = None
        self._checkpoint = checkpoint
        self._pipe = self._build(*self._build_args)

    def _views(self, outputs):
        """DALI outputs -> (view1, view2[, labels]). CUDA: the chain reads DALI's crops in place (DLPack). CPU: torch
        crops the images (array rows, or DALI's decoded files) with DALI's windows, then runs the chain. Either way
        the views are fresh torch tensors."""
        self.last_outputs = outputs  # kept for tests that check what the chain read
        out = dict(zip(self._names, outputs))
        labels = None
        params = [torch.from_dlpack(out[f"params{v}"].as_tensor()) for v in (1, 2)]  # (B, N_PARAMS) float32
        if self.on_gpu:
            crops = [torch.from_dlpack(out[f"crops{v}"].as_tensor()) for v in (1, 2)]  # (B, 3, S, S) uint8
            chain = photometric_variant(self.photometric_variant)
            views = tuple(chain(crops[v], params[v], **self._chains[v]) for v in (0, 1))
        else:
            if "index" in out:  # array rows, by the index DALI's source emitted
                index = torch.from_dlpack(out["index"].as_tensor()).reshape(-1)  # (B,) int64
                images = [self.images[k] for k in index.tolist()]  # (H, W, 3) views, no copy
                if self.with_labels:
                    labels = self.labels_t.index_select(0, index)
            else:  # decoded files: (H_i, W_i, 3) each
                images = [torch.from_dlpack(out["images"][i]) for i in range(self.batch_size)]
            channels = 1 if self.gray_input else 3
            windows = [torch.from_dlpack(out[f"window{v}"].as_tensor()) for v in (1, 2)]  # (B, 5) int32 each
            crops = crop_resize_flip_many([(images, w) for w in windows], self.image_size, channels,
                                          self.num_threads)  # (B, 3, S, S) uint8 each
            # both views' chunks share the workers (measured the same or better than one view after the other; making
            # each chunk's crops inside the chunk measured worse)
            views = tuple(photometric_many([dict(crops=crops[v], params=params[v], **self._chains[v])
                                            for v in (0, 1)], self.num_threads))
        self.last_crops = crops  # (B, 3, S, S) uint8 each, for tests
        if self.on_gpu:
            # The chain's kernels are queued on torch's stream and read DALI's buffers: hold those buffers until an
            # event after the chain has passed (polled, no host sync), at most 4 batches (then wait for the oldest).
            event = torch.cuda.Event()
            event.record()
            self._in_flight.append((outputs, event))
            while self._in_flight and (len(self._in_flight) > 4 or self._in_flight[0][1].query()):
                self._in_flight[0][1].synchronize()  # sync: only when 4 batches' chains are still queued
                self._in_flight.popleft()
        if not self.with_labels:
            return views
        if labels is None:
            labels = torch.from_dlpack(out["labels"].as_tensor()).reshape(-1).to(torch.int64).clone()  # (B,)
        return (*views, labels)

    def _submit(self, outputs, slot: int):
        """CPU arrays with processes: hand a batch of DALI outputs to the workers; returns its labels (or None)."""
        out = dict(zip(self._names, outputs))
        index = torch.from_dlpack(out["index"].as_tensor()).reshape(-1)  # (B,) int64
        windows = [torch.from_dlpack(out[f"window{v}"].as_tensor()) for v in (1, 2)]  # (B, 5) int32 each
        params = [torch.from_dlpack(out[f"params{v}"].as_tensor()) for v in (1, 2)]  # (B, N_PARAMS) float32
        self._procs.submit(slot, index, windows, params)
        return self.labels_t.index_select(0, index) if self.with_labels else None

    def _epoch_ahead(self):
        """epoch() for CPU arrays with worker processes: DALI draws batch n + 1 and the workers start on it before
        batch n is yielded, so they compute while the consumer uses n. While batches drawn are not yet yielded,
        self._ahead holds (this iterator, the checkpoint taken before DALI drew the oldest of them): state() returns
        that checkpoint, and whatever ends the iterator early (the consumer stops, an error or Ctrl-C anywhere in it,
        a later epoch() call on the same loader) gives them back: the workers drained, the pipeline rebuilt at that
        checkpoint. So the batches, and resume, are exactly those of the synchronous path."""
        if self._ahead is not None:  # an earlier epoch() iterator, suspended with a batch drawn ahead, ends here
            self._give_back_ahead()
        token = self._owner = object()
        self.last_crops = None
        queue: collections.deque = collections.deque()  # (slot, labels, checkpoint before it): drawn, not yielded

        def mark() -> None:  # what state() and a give-back need: the checkpoint before the oldest not yielded
            self._ahead = (token, queue[0][2]) if queue else None

        slot, retried = 0, False
        try:
            while True:
                before = self._pipe.checkpoint()  # after every batch drawn so far
                try:
                    outputs = self._run()
                except StopIteration:  # the external source ended the epoch
                    self._pipe.reset()
                    if not queue and not retried:  # restored exactly at an epoch's end: start the next
                        retried = True
                        continue
                    outputs = None
                if outputs is not None:
                    queue.append((slot, self._submit(outputs, slot), before))
                    slot = 1 - slot
                    mark()
                if len(queue) == 2 or (outputs is None and queue):  # the next one is with the workers
                    views = self._procs.collect(queue[0][0])
                    labels = queue.popleft()[1]
                    mark()
                    yield views if labels is None else (*views, labels)
                    if self._owner is not token:
                        raise FastByolError("this epoch() iterator was ended by a later epoch() call on the same "
                                            "loader (one iterator at a time)")
                if outputs is None:
                    break
        finally:
            if self._ahead is not None and self._ahead[0] is token:
                self._give_back_ahead()

    def _give_back_ahead(self) -> None:
        """The batch drawn ahead (self._ahead) back: the workers drained, DALI rebuilt at the checkpoint taken before
        it was drawn."""
        before = self._ahead[1]
        self._ahead = None
        try:
            self._procs.drain()
        except FastByolError:
            pass  # the workers failed or were closed; their next use raises
        self._rebuild(before)

    def epoch(self, first_step: int = 0):
        """Yield this epoch's batches of (view1, view2), from batch `first_step` on (after a resume).

        Arrays: one shuffled pass, the last partial batch dropped; a restored position continues the epoch it was
        saved in. Encoded files: steps_per_epoch batches of the reader's stream, which reshuffles after each of its
        own passes, so every image is read once per N images."""
        if self.encoded:
            for _ in range(first_step, self._steps):
                yield self._views(self._run())
            return
        if self._procs is not None:
            yield from self._epoch_ahead()
            return
        yielded, retried = 0, False
        while True:
            try:
                outputs = self._run()
            except StopIteration:  # the external source ended the epoch
                self._pipe.reset()
                if yielded == 0 and not retried:  # restored exactly at an epoch's end: start the next
                    retried = True
                    continue
                break
            yielded += 1
            yield self._views(outputs)
