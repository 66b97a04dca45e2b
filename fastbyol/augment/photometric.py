"""BYOL's photometric chain over a batch, in plain PyTorch: the CPU path, the test oracle and the benchmark baseline.

    spec = ChainSpec(blur_window=23, solarize_threshold=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = photometric(crops, params, spec)

crops (B, 3, S, S) uint8: the random resized crops, already flipped (planar, NCHW contiguous: DALI's output on
CUDA, fastbyol.augment.crops' on the CPU; any strides work, planar is the fast case on the CPU).
params (B, N_PARAMS) float32: each image's random parameters, one column per name in PARAM_NAMES (DALI draws them:
fastbyol.augment.pipelines.draw_params; tests and benchmarks: fastbyol.augment.views.sample_params).
spec: the chain's constants for one view (ChainSpec: blur window, solarize threshold, mean and std, gray input, out
dtype, and the CPU path's blur tail and chunk size); every backend takes (crops, params, spec).
out (B, 3, S, S) channels_last (NHWC memory), normalized, spec.out_dtype.

The chain, per image, as the official `byol/utils/augmentations.py`, on [0, 1] floats:
  with p jitter: brightness, contrast, saturation, hue in the image's own random order (one of the 24 in ORDERS),
                 each followed by a clip to [0, 1]
  with p gray:   grayscale (0.2989 R + 0.5870 G + 0.1140 B in all three channels)
  with p blur:   separable Gaussian blur, spec.blur_window taps, zero padding (tf depthwise_conv2d 'SAME'), sigma
  with p solarize: x < threshold ? x : 1 - x
  clip to [0, 1]; normalize (x - mean) / std.
The ops, exactly (tests/test_augment_fidelity.py checks each against a numpy port of the official JAX ops):
  brightness  x + delta                                   (tf: additive)
  contrast    (x - m) f + m, m = each channel's mean over the image (tf.image.adjust_contrast)
  saturation  HSV s <- min(s f, 1): with v = max(R, G, B), c = v - min(R, G, B), that is x <- v - k (v - x),
              k = min(f, v / c) (h and v unchanged, so each channel moves toward v by the same ratio)
  hue         HSV h <- h + delta turns: channel n (R: 5, G: 3, B: 1) = v - c clip(min(k, 4 - k), 0, 1),
              k = (n + 6 h) mod 6 (the textbook HSV -> RGB; tf.image.adjust_hue)

How the per-image random order is handled, and why (two formulations of the same chain, tested equal):
- `photometric` (the reference and the CPU path) groups the batch by jitter order: the images of one group go
  through the four ops in the same order, as a few whole-tensor ops on a (n, 3, S, S) planar float chunk; each op is
  computed once per image (no wasted work), and a chunk is small enough (CHUNK_PIXELS) to stay in the CPU's cache for
  the whole chain. Saturation and hue commute (they change s and h, each keeping the other and v), so where they are
  adjacent in an order they run as one HSV round trip, and such orders share a group. Its host-side grouping (one
  .tolist() of the parameters) would be a graph break under torch.compile, and on a GPU its ~20 groups mean ~20x
  more, smaller launches.
Written for the CPU: no torch.where and no remainder (each ~10-30x an arithmetic op there), in-place ops on fresh
temporaries, index_select rather than advanced indexing. What the whole CPU loader costs (DALI's draws, the crops,
this chain) is measured by benchmarks/augment_vs_lightly.py; its figures are in benchmarks/results/.
- `photometric_by_slot` (what torch.compile gets, backend "compiled") selects per slot: in each of the 4 slots every
  op is computed for every image and torch.where keeps the image's own: 4x the jitter arithmetic, no data-dependent
  shapes, so the compiler sees one static graph and fuses it (on a GPU the chain is memory-bound: the extra
  arithmetic is nearly free there, and the work on the CPU eager path would be 4x).
The Triton kernel (fastbyol.kernels.photometric) handles the order inside the kernel (per image, per slot).

Grayscale input (spec.gray_input, every crop has R = G = B): saturation and hue are exact identities (c = 0), the
other ops act on each channel alike, so the chain runs on one plane and the normalization writes three: the same
result at a third of the work (tested against the colour path).
"""

from __future__ import annotations

import concurrent.futures
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import AugmentConfig

PARAM_NAMES = ("jitter", "brightness", "contrast", "saturation", "hue", "order", "gray", "blur", "sigma", "solarize")
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, BLUR, SIGMA, SOLARIZE = range(len(PARAM_NAMES))
N_PARAMS = len(PARAM_NAMES)
# coins (jitter, gray, blur, solarize) are 0.0 / 1.0; `order` is an index into ORDERS (0..23), exact in float32
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # op ids 0..3, in ORDERS' entries
ORDERS = tuple(itertools.permutations(range(4)))  # the 24 jitter orders: ORDERS[k][slot] = op id applied at slot
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # the official rgb_to_grayscale weights
# images per CPU chunk = max(1, CHUNK_PIXELS // S^2): 2 at 224 px, 14 at 96, 167 at 28 (a run sets it: --chunk-pixels)
CHUNK_PIXELS = AugmentConfig().chunk_pixels
TAP_TAIL = 1e-7  # the loader's CPU path skips blur taps that carry less than this weight on each side


@dataclass(frozen=True)
class ChainSpec:
    """The chain's constants for one view: everything a call needs besides the batch (crops, params). The loader
    builds one per view (TwoViewLoader._chain) and hands it to every batch's chain, whichever backend runs it.

    blur_tail and chunk_pixels are the eager reference's (`photometric`): the per-slot form and the Triton kernel
    keep every tap and have no chunks, so they ignore them. gray_input: every crop has R = G = B; the reference then
    runs on one plane (the module docstring), the others compute the colour arithmetic, exact on gray pixels."""

    blur_window: int  # taps of the Gaussian blur, odd (ViewSpec.blur_window of the view side)
    solarize_threshold: float  # x < threshold ? x : 1 - x
    mean: tuple[float, float, float]  # the normalization, per channel: (x - mean) / std
    std: tuple[float, float, float]
    gray_input: bool = False
    out_dtype: torch.dtype = torch.float32  # the views' dtype (the loader: float16 on CUDA, float32 on the CPU)
    # skip the outer blur taps carrying less than this weight on each side (per chunk, the widest blur of the chunk
    # decides; the weights kept are unchanged): the result moves by at most blur_tail per pass. 0 keeps every tap.
    # The loader's CPU path uses TAP_TAIL (1e-7: below float32's resolution of a pixel near 1); a narrow blur (sigma
    # 0.5) then costs 7 taps instead of 23 at 224 px.
    blur_tail: float = 0.0
    chunk_pixels: int = CHUNK_PIXELS  # images per chunk: max(1, chunk_pixels // S^2)


def _col(v: torch.Tensor) -> torch.Tensor:
    """(n,) per-image values -> (n, 1, 1, 1), broadcast over (n, C, H, W)."""
    return v.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------------- the ops
# Each takes a planar float image batch x (n, C, H, W) in [0, 1] (C = 3, or 1 for grayscale input where noted) and
# per-image parameters (n,), and returns a new tensor: pure functions (their in-place calls act on fresh temporaries),
# so torch.compile sees plain dataflow and the grouped path can chain them.


def adjust_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """clip(x + delta)."""
    return (x + _col(delta)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clip((x - m) f + m) = clip(x f + (1 - f) m), m (n, C, 1, 1) each channel's mean over the image."""
    f = _col(factor)
    m = x.mean(dim=(2, 3), keepdim=True)
    return (x * f).add_(m * (1.0 - f)).clamp_(0.0, 1.0)


def _value_and_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v = max over channels, c = v - min over channels: each (n, 1, H, W)."""
    v = x.amax(dim=1, keepdim=True)
    return v, v - x.amin(dim=1, keepdim=True)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV saturation times `factor`, clipped to 1: x <- v - k (v - x), k = min(f, v / c). RGB only."""
    v, c = _value_and_chroma(x)
    # c = 0 (gray pixel): x = v, any k leaves it; the clamp keeps 0 / 0 out (v / tiny = 0 when v = 0)
    k = torch.minimum(_col(factor), v / c.clamp_min(1e-20))
    return (x - v).mul_(k).add_(v).clamp_(0.0, 1.0)


def _is_less(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a < b, else 0.0, in a's dtype (sign arithmetic: on the CPU ~3x cheaper than a bool compare + cast,
    and exact: a - b is 0 only when a == b, negative only when a < b)."""
    return (b - a).sign_().clamp_(0.0, 1.0)


def hue_sixths(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, v, c) of an RGB batch (n, 3, H, W): HSV hue in sixths of a turn, h in [0, 6), value and chroma, each
    (n, 1, H, W). Branch-free (two conditional swaps by min/max, after Hocevar's fast RGB -> HSV): no torch.where,
    which is ~30x slower than arithmetic on the CPU."""
    r, g, b = x.split(1, dim=1)  # (n, 1, H, W) each
    swap_gb = _is_less(g, b)  # sort g >= b
    g, b = torch.maximum(g, b), torch.minimum(g, b)
    swap_rg = _is_less(r, g)  # sort r >= g
    v, g = torch.maximum(r, g), torch.minimum(r, g)
    c = v - torch.minimum(g, b)
    # offset (in sixths): 0, -6 after the first swap; -2 - offset after the second (Hocevar's K, times 6)
    offset = swap_gb * -6.0
    offset = offset + swap_rg * (-2.0 - 2.0 * offset)
    h = ((g - b) / c.clamp_min(1e-20)).add_(offset).abs_()  # in [0, 6]: 6 only for h = 0 reached from below
    return h, v, c


def hsv_to_rgb(h: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) RGB from hue h (sixths, any real), value v and chroma c (n, 1, H, W): channel n (R: 5, G: 3,
    B: 1) = v - c clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6, written with all three channels at once."""
    k = h + _HSV_OFFSETS.to(h.dtype)  # (n, 3, H, W): n + h
    k = k.sub_(torch.floor(k * (1.0 / 6.0)).mul_(6.0))  # (n + h) mod 6, in [0, 6)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return v - c * w


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).reshape(1, 3, 1, 1)  # n for R, G, B


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """HSV hue plus `delta` turns. RGB only."""
    h, v, c = hue_sixths(x)
    return hsv_to_rgb(h.add_(_col(delta) * 6.0), v, c).clamp_(0.0, 1.0)


JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
JITTER_COLUMNS = (BRIGHTNESS, CONTRAST, SATURATION, HUE)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """0.2989 R + 0.5870 G + 0.1140 B in every channel; (n, 3, H, W) -> (n, 3, H, W) (a (n, 1) input: the same sum
    of the one plane, so grayscale input goes through the same arithmetic)."""
    wr, wg, wb = GRAY_WEIGHTS
    if x.shape[1] == 1:
        return (x * wr).add_(x * wg).add_(x * wb)
    r, g, b = x.split(1, dim=1)
    return (r * wr).add_(g * wg).add_(b * wb).expand_as(x).contiguous()


def blur_taps(sigma: torch.Tensor, window: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) sigmas -> (n, window) normalized Gaussian taps exp(-t^2 / (2 sigma^2)), t = -r..r (official)."""
    r = window // 2
    t = torch.arange(-r, r + 1, device=sigma.device, dtype=dtype)
    k = torch.exp(-(t * t) / (2.0 * sigma.to(dtype).reshape(-1, 1) ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable blur of x (n, C, H, W) with each image's taps (n, K), zero padding (same size out).

    A depthwise convolution over the n*C planes, run channels_last: on the CPU oneDNN's depthwise kernel is ~8x faster
    in that layout than in NCHW (measured on 2 cores at 224 px: 0.9 ms against 8 ms per 3-channel image); its time
    grows with K (about 3x from 7 taps to 23)."""
    n, C, H, W = x.shape
    K = taps.shape[1]
    r = K // 2
    w = taps.to(x.dtype).repeat_interleave(C, dim=0)  # (n*C, K): each channel of image i takes image i's taps
    planes = x.reshape(1, n * C, H, W).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(planes, w.reshape(n * C, 1, 1, K), padding=(0, r), groups=n * C)
    y = F.conv2d(y, w.reshape(n * C, 1, K, 1), padding=(r, 0), groups=n * C)
    return y.contiguous().reshape(n, C, H, W)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x < threshold ? x : 1 - x. At the official 0.5 that is exactly min(x, 1 - x) (1 - x is exact for x >= 0.5)."""
    if threshold == 0.5:
        return torch.minimum(x, 1.0 - x)
    return x + (x - threshold).sign_().add_(1.0).clamp_(0.0, 1.0) * (1.0 - 2.0 * x)


def _normalize_constants(mean, std, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) scale 1/std and shift -mean/std: y = x * scale + shift."""
    m = torch.tensor(mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).reshape(1, 3, 1, 1)
    return (1.0 / s).to(dtype=dtype, device=device), (-m / s).to(dtype=dtype, device=device)


def _to_planar(crops: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, 3, S, S) uint8 -> (n, channels, S, S) contiguous float in [0, 1]. From planar uint8 this is one straight
    conversion (on the CPU ~20x cheaper than converting NHWC, a transposition: why DALI emits planar crops)."""
    n, _, H, W = crops.shape
    x = torch.empty((n, channels, H, W), dtype=dtype, device=crops.device)
    x.copy_(crops[:, :channels])
    return x.mul_(1.0 / 255.0)


class ScratchBuffers:
    """Grow-only temporaries a chain reuses call after call: a loader holds one and passes it in (the Triton chain's
    `buffers=`), so a step does not allocate its scratch afresh (at 224 px, batch 256: the blur's fp32 scratch and
    tmp, 154 MB each, twice a step, one per view).

    `get(name, shape, dtype, device)` returns a (shape) view of the storage kept under (name, dtype, device), grown
    (replaced by a larger one) only when `shape` needs more elements than it has. Its contents are whatever the last
    call left: a kernel must write before it reads. Reuse is safe for work queued in order on one stream (the next
    call's writes queue after this call's reads); `allocations` counts the storages made so far."""

    def __init__(self) -> None:
        self._flat: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self.allocations = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        key = (name, dtype, torch.device(device))
        flat = self._flat.get(key)
        if flat is None or flat.numel() < n:
            self._flat.pop(key, None)  # the old storage goes back to the allocator before the new one is made
            flat = torch.empty(max(n, 1), dtype=dtype, device=device)
            self._flat[key] = flat
            self.allocations += 1
        return flat[:n].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._flat.values())


def check_chain_inputs(crops: torch.Tensor, params: torch.Tensor) -> None:
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must be uint8 (B, 3, S, S), got {crops.dtype} {tuple(crops.shape)}")
    if params.shape != (crops.shape[0], N_PARAMS):
        raise ValueError(f"params must be ({crops.shape[0]}, {N_PARAMS}), got {tuple(params.shape)}")


def finish(x: torch.Tensor, solarize_coin: torch.Tensor | None, threshold: float, scale: torch.Tensor,
           shift: torch.Tensor) -> torch.Tensor:
    """Solarize where the coin (n, 1, 1, 1) is 1, clip, normalize (x scale + shift): (n, C, H, W) -> (n, 3, H, W)
    planar (a gray plane, C = 1, broadcasts to three channels). Branch-free and exact: at threshold 0.5 the
    solarized value is min(x, 1 - x + 2 (1 - coin)), which is x when the coin is 0."""
    if solarize_coin is not None:
        if threshold == 0.5:
            x = torch.minimum(x, (1.0 - x).add_((1.0 - solarize_coin) * 2.0))
        else:
            x = x + (x - threshold).sign_().add_(1.0).clamp_(0.0, 1.0).mul_(solarize_coin) * (1.0 - 2.0 * x)
    return (x.clamp(0.0, 1.0) * scale).add_(shift)  # scale (1, 3, 1, 1) broadcasts a gray plane


def adjust_saturation_hue(x: torch.Tensor, factor: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Saturation then hue, or hue then saturation (the same: they change s and h, each keeping the other and v),
    in one HSV round trip: c <- min(c f, v), h <- h + delta. Equals the two ops in a row, each clipped, up to float
    rounding (both keep pixels in [0, 1], so the clip between them never acts). Used when the two are adjacent in an
    image's order: half of the 24 orders."""
    h, v, c = hue_sixths(x)
    c = torch.minimum(c * _col(factor), v)  # s' = min(s f, 1), times v
    return hsv_to_rgb(h.add_(_col(delta) * 6.0), v, c).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- the reference: chunks grouped by jitter order
class _Batch:
    """What every chunk of one call reads, computed once per batch: parameters by column, each image's jitter steps,
    the coins as Python lists, the blur taps and the radius each image's taps need."""

    def __init__(self, params: torch.Tensor, spec: ChainSpec):
        self.params = params  # (B, N_PARAMS)
        self.by_column = params.t().contiguous()  # (N_PARAMS, B): each parameter a contiguous row
        rows = params[:, [JITTER, ORDER]].tolist()  # host-side: one transfer of (B, 2)
        self.steps = [_steps(ORDERS[int(order)] if jitter > 0.5 else None, spec.gray_input) for jitter, order in rows]
        self.gray, self.blur, self.solarize = ((params[:, [GRAY, BLUR, SOLARIZE]] > 0.5).t().tolist())
        self.taps = blur_taps(params[:, SIGMA], spec.blur_window, params.dtype)  # (B, K)
        K = self.taps.shape[1]
        if spec.blur_tail > 0:  # per image: taps left of the radius carry <= blur_tail of the weight (each side)
            outer = torch.cumsum(self.taps[:, :K // 2].double(), dim=1)
            self.radius = (K // 2 - (outer <= spec.blur_tail).sum(dim=1)).tolist()
        else:
            self.radius = [K // 2] * params.shape[0]

    def chunks(self, max_images: int) -> list[list[int]]:
        """Image indices grouped by jitter steps (one order, or two orders that are the same steps), in runs of at
        most max_images: every op of a chunk is one whole-tensor op over it, and small runs stay in L2 (mixing
        orders in bigger chunks, each op on the images that take it, measured slower here: more cache misses)."""
        groups: dict[tuple, list[int]] = {}
        for i, steps in enumerate(self.steps):
            groups.setdefault(steps, []).append(i)
        return [idx[a:a + max_images] for _, idx in sorted(groups.items()) for a in range(0, len(idx), max_images)]


def _steps(order: tuple[int, ...] | None, gray_input: bool) -> tuple[tuple[int, ...], ...]:
    """The jitter ops of one order as steps: (op,) alone, or (2, 3) for saturation and hue when adjacent (they
    commute: one HSV round trip, adjust_saturation_hue). Gray input: brightness and contrast only."""
    ops = [op for op in (order or ()) if not (gray_input and op >= 2)]  # sat and hue leave gray pixels as they are
    steps: list[tuple[int, ...]] = []
    for op in ops:
        if steps and {steps[-1][0], op} == {2, 3} and len(steps[-1]) == 1:
            steps[-1] = (2, 3)
        else:
            steps.append((op,))
    return tuple(steps)


def _hsv_step(x: torch.Tensor, col: torch.Tensor, kind: tuple[int, ...]) -> torch.Tensor:
    if kind == (2, 3):
        return adjust_saturation_hue(x, col[SATURATION], col[HUE])
    return JITTER_FNS[kind[0]](x, col[JITTER_COLUMNS[kind[0]]])


def _chain(x: torch.Tensor, batch: _Batch, idx: list[int], sel: torch.Tensor, solarize_threshold: float,
           scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """One chunk: x (n, C, S, S) planar float in [0, 1], the images `idx` (`sel` on the device) of the batch, all
    with the same jitter steps -> (n, 3, S, S) after jitter, grayscale, blur, solarize, clip, normalize."""
    col = batch.by_column.index_select(1, sel)  # (N_PARAMS, n); index_select: advanced indexing is ~20x slower
    for step in batch.steps[idx[0]]:  # a chunk's images share their jitter steps (_Batch.chunks)
        x = _hsv_step(x, col, step)
    x = _apply_to(x, [batch.gray[i] for i in idx], grayscale)
    blurred = [j for j, i in enumerate(idx) if batch.blur[i]]
    if blurred:
        K = batch.taps.shape[1]
        r = max(batch.radius[idx[j]] for j in blurred)  # the widest blur of the chunk sets the taps kept
        taps = batch.taps.index_select(0, sel)[:, K // 2 - r:K // 2 + r + 1]
        x = _apply_to(x, [batch.blur[i] for i in idx], with_index=True,
                      fn=lambda y, sub: gaussian_blur(y, taps if sub is None else taps.index_select(0, sub)))
    coin = None  # skip the solarize arithmetic when no image of the chunk takes it
    if any(batch.solarize[i] for i in idx):
        coin = (col[SOLARIZE] > 0.5).to(x.dtype).reshape(-1, 1, 1, 1)
    return finish(x, coin, solarize_threshold, scale, shift)


def _apply_to(x: torch.Tensor, chosen: list[bool], fn, with_index: bool = False) -> torch.Tensor:
    """fn on the chosen images of x (n, C, H, W) only: all, none, or a gathered subset written back (no torch.where:
    on the CPU it costs ~30 arithmetic ops). with_index: fn(subset, positions of the subset in x, None for all)."""
    if not any(chosen):
        return x
    if all(chosen):
        return fn(x, None) if with_index else fn(x)
    sub = torch.tensor([i for i, c in enumerate(chosen) if c], device=x.device)
    part = x.index_select(0, sub)
    y = fn(part, sub) if with_index else fn(part)
    return x.index_copy_(0, sub, y)


def photometric(crops: torch.Tensor, params: torch.Tensor, spec: ChainSpec, *,
                compute_dtype: torch.dtype = torch.float32, threads: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The chain over a batch: crops (B, 3, S, S) uint8, params (B, N_PARAMS), spec (one view's ChainSpec) ->
    (B, 3, S, S) spec.out_dtype, channels_last.

    Works on chunks of at most spec.chunk_pixels // S^2 images of one jitter order: every op is a whole-tensor torch
    op over the chunk, and the chunk stays in cache from the uint8 load to the normalized store. compute_dtype float64
    makes it the tests' oracle.

    threads: None runs the chunks in the calling thread (with its torch intra-op threads); n runs them on n worker
    threads with one torch thread each (chunks are independent and write disjoint rows of the output). On the CPU
    that is how the chain uses several cores: per-op OpenMP parallelism on cache-sized tensors spends more in its
    barriers than it gains, and collapses when the cores are shared (measured on 2 busy cores: an in-cache add
    took 10 ms with 2 OpenMP threads against 20 us with 1).
    out: where to write, a contiguous (B, S, S, 3) spec.out_dtype tensor (NHWC; e.g. shared memory); the result is its
    channels_last view. None: a new one."""
    return _run([prepare_photometric(crops, params, spec, compute_dtype=compute_dtype, out=out)], threads)[0]


def photometric_many(jobs: list[tuple[torch.Tensor, torch.Tensor, ChainSpec]],
                     threads: int | None = None) -> list[torch.Tensor]:
    """photometric for several batches at once, (crops, params, spec) each (e.g. both views): their chunks share the
    workers, so no worker waits for the end of one batch before starting the next."""
    return _run([prepare_photometric(crops, params, spec) for crops, params, spec in jobs], threads)


def _run(prepared: list[tuple], threads: int | None) -> list[torch.Tensor]:
    """Every chunk of the prepared batches (prepare_photometric's), in this thread or on `threads` workers; their
    outputs."""
    tasks = [(run, idx) for run, chunks, _ in prepared for idx in chunks]
    if threads is None:
        for run, idx in tasks:
            run(idx)
    else:
        for done in [worker_pool(threads).submit(run, idx) for run, idx in tasks]:
            done.result()  # re-raises a worker's exception here
    return [out for _, _, out in prepared]


def prepare_photometric(crops: torch.Tensor, params: torch.Tensor, spec: ChainSpec, *,
                        compute_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None):
    """(run(indices) for one chunk, the chunks, the output (B, 3, S, S) channels_last) of one batch: photometric's
    work cut into independent chunks, for photometric_many's threads and the CPU worker processes
    (fastbyol.augment.cpu_workers), which run them."""
    check_chain_inputs(crops, params)
    B, S = crops.shape[0], crops.shape[2]
    device, out_dtype = crops.device, spec.out_dtype
    channels = 1 if spec.gray_input else 3
    if out is None:
        out = torch.empty((B, S, S, 3), dtype=out_dtype, device=device)  # NHWC memory: channels_last views
    elif out.shape != (B, S, S, 3) or out.dtype != out_dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} ({B}, {S}, {S}, 3) tensor on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    scale, shift = _normalize_constants(spec.mean, spec.std, compute_dtype, device)
    batch = _Batch(params.to(compute_dtype), spec)
    # NHWC rows written by numpy on the CPU: its strided copy (one channel at a time, contiguous reads) takes half
    # the time of torch's permuted copy, and releases the GIL like torch does
    out_np = out.numpy() if out.device.type == "cpu" and out_dtype == compute_dtype else None

    def run(idx: list[int]) -> None:
        sel = torch.tensor(idx, device=device)
        y = _chain(_to_planar(crops.index_select(0, sel), channels, compute_dtype), batch, idx, sel,
                   spec.solarize_threshold, scale, shift)
        if out_np is not None:
            y_np = y.numpy()
            for j, i in enumerate(idx):  # interleave into out's rows (NHWC)
                for c in range(3):
                    out_np[i, :, :, c] = y_np[j, c]
        else:
            for j, i in enumerate(idx):
                out[i].copy_(y[j].permute(1, 2, 0))

    return run, batch.chunks(max(1, spec.chunk_pixels // (S * S))), out.permute(0, 3, 1, 2)


_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def worker_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """A process-wide pool of `threads` workers, each with one torch intra-op thread (a per-thread setting: the
    caller's own thread count is left as it is)."""
    if threads not in _pools:
        _pools[threads] = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="fastbyol-photometric", initializer=torch.set_num_threads,
            initargs=(1,))
    return _pools[threads]


# --------------------------------------------------------------------- the same chain, selected per slot (compile)
def photometric_by_slot(crops: torch.Tensor, params: torch.Tensor, spec: ChainSpec) -> torch.Tensor:
    """`photometric` without data-dependent control flow, for torch.compile: every op on every image, torch.where
    keeps each image's own (see the module docstring). Same arguments and result; of the spec, gray_input, blur_tail
    and chunk_pixels are the reference's (the colour arithmetic leaves gray pixels exact, every tap is kept)."""
    check_chain_inputs(crops, params)
    dtype = torch.float32
    p = params.to(dtype)
    x = crops.to(dtype) * (1.0 / 255.0)  # (B, 3, S, S) float
    jitter = p[:, JITTER] > 0.5
    table = torch.tensor(ORDERS, device=crops.device)  # (24, 4)
    order = table[p[:, ORDER].long().clamp_(0, len(ORDERS) - 1)]  # (B, 4) op id per slot
    for slot in range(4):
        op_here = torch.where(jitter, order[:, slot], -1)  # (B,): -1 = no jitter, the image passes through
        y = x
        for op, fn in enumerate(JITTER_FNS):
            y = torch.where(_col(op_here == op), fn(x, p[:, JITTER_COLUMNS[op]]), y)
        x = y
    x = torch.where(_col(p[:, GRAY] > 0.5), grayscale(x), x)
    x = torch.where(_col(p[:, BLUR] > 0.5), gaussian_blur(x, blur_taps(p[:, SIGMA], spec.blur_window, dtype)), x)
    x = torch.where(_col(p[:, SOLARIZE] > 0.5), solarize(x, spec.solarize_threshold), x).clamp_(0.0, 1.0)
    scale, shift = _normalize_constants(spec.mean, spec.std, dtype, crops.device)
    return (x * scale + shift).to(spec.out_dtype).contiguous(memory_format=torch.channels_last)
