"""BYOL's photometric chain in four Triton launches per view: jitter in each image's random order, grayscale, blur,
solarize, clip, normalize, written as channels_last fp16 (or fp32).

    out = photometric_triton(crops, params, ChainSpec(blur_window=23, solarize_threshold=0.5, mean=..., std=...))

Same arguments and result as the torch reference `fastbyol.augment.photometric.photometric` (its module docstring has
the math of every op; tests/test_photometric.py checks this kernel against it in float64): crops (B, 3, S, S) uint8 (any
strides: DALI's planar output, or an NHWC batch seen as NCHW), params (B, N_PARAMS) float32, both on the device, spec
the view's ChainSpec; out (B, 3, S, S) channels_last, spec.out_dtype.

The launches, per view (B images of S x S):
  1. _stats:   grid (B, NB): each program runs the jitter ops that precede contrast in its image's order over a block
               of pixels and writes its per-channel sums (contrast needs each channel's mean of the state just before
               it, a reduction in the middle of a per-pixel chain). Partial sums, not atomics: deterministic.
  2. _color:   grid (B, NB): adds the NB partial sums of its image (the contrast means), runs the whole jitter in the
               image's order (ORDERS[order][slot], a branch per slot on a per-program scalar: no divergence), the
               grayscale; then an image without blur is finished here (solarize, clip, normalize, NHWC store), an
               image with blur goes to an fp32 planar scratch (B, 3, S, S).
  3. _blur_h:  grid (B, row blocks): horizontal pass, `window` taps, zero padding, taps computed in the kernel from
               sigma (normalized as the reference); images without blur return at once.
  4. _blur_v:  vertical pass, then solarize, clip, normalize, NHWC store. Every grid, block and warp count comes
               from `photometric_launches`, which the ahead-of-time compile check (fastbyol.tools.gpu_compile) also
               uses.

Memory traffic per pixel (3 channels): uint8 read twice (6 B), output written once (6 B in fp16); images with blur add
a 12 B scratch write + read per pass (48 B). The eager reference moves ~100 planar float passes per pixel
(~1.2 KB), and the per-slot compiled form computes every op in every slot (4x the jitter arithmetic).
Taps are re-read from L1/L2 (window loads per output per pass): at 224 px, 23 taps, that is the kernels' main cost.
"""

from __future__ import annotations

import torch

from fastbyol.augment.photometric import (BLUR, BRIGHTNESS, CONTRAST, GRAY, HUE, JITTER, N_PARAMS, ORDER, ORDERS,
                                          SATURATION, SIGMA, SOLARIZE, ChainSpec, ScratchBuffers, check_chain_inputs)

from ._dispatch import interpreter_on, triton_available

if triton_available():
    import triton
    import triton.language as tl

    # the parameter columns, by name (fastbyol.augment.photometric.PARAM_NAMES): compile-time constants of every kernel
    _JITTER = tl.constexpr(JITTER)
    _BRIGHTNESS = tl.constexpr(BRIGHTNESS)
    _CONTRAST = tl.constexpr(CONTRAST)
    _SATURATION = tl.constexpr(SATURATION)
    _HUE = tl.constexpr(HUE)
    _ORDER = tl.constexpr(ORDER)
    _GRAY = tl.constexpr(GRAY)
    _BLUR = tl.constexpr(BLUR)
    _SIGMA = tl.constexpr(SIGMA)
    _SOLARIZE = tl.constexpr(SOLARIZE)

    @triton.jit
    def _clip01(x):
        return tl.minimum(tl.maximum(x, 0.0), 1.0)

    @triton.jit
    def _jitter_op(op, r, g, b, P, mr, mg, mb):
        """Apply jitter op `op` (0 brightness, 1 contrast with means mr, mg, mb, 2 saturation, 3 hue) to the pixel
        block (r, g, b); P points at the image's parameter row. Each op ends with a clip, as the official code."""
        if op == 0:
            d = tl.load(P + _BRIGHTNESS)
            r = _clip01(r + d)
            g = _clip01(g + d)
            b = _clip01(b + d)
        elif op == 1:
            f = tl.load(P + _CONTRAST)
            r = _clip01((r - mr) * f + mr)
            g = _clip01((g - mg) * f + mg)
            b = _clip01((b - mb) * f + mb)
        elif op == 2:
            f = tl.load(P + _SATURATION)
            v = tl.maximum(r, tl.maximum(g, b))
            c = v - tl.minimum(r, tl.minimum(g, b))
            k = tl.minimum(f, v / tl.maximum(c, 1e-20))  # s' / s = min(f, 1 / s)
            r = _clip01(v - k * (v - r))
            g = _clip01(v - k * (v - g))
            b = _clip01(v - k * (v - b))
        else:
            d = tl.load(P + _HUE)
            # hue in sixths by two conditional swaps (Hocevar), as fastbyol.augment.photometric.hue_sixths
            swap_gb = g < b
            g1 = tl.maximum(g, b)
            b1 = tl.minimum(g, b)
            off = tl.where(swap_gb, -6.0, 0.0)
            swap_rg = r < g1
            v = tl.maximum(r, g1)
            g2 = tl.minimum(r, g1)
            off = tl.where(swap_rg, -2.0 - off, off)
            c = v - tl.minimum(g2, b1)
            h = tl.abs(off + (g2 - b1) / tl.maximum(c, 1e-20)) + 6.0 * d
            # channel n (R 5, G 3, B 1) = v - c clip(2 - |u|, 0, 1), u = (n + h) mod 6 - 2 in [-2, 4)
            u = h + 3.0
            u = u - 6.0 * tl.floor(u * (1.0 / 6.0) + 1.0 / 3.0)
            r = _clip01(v - c * _clip01(2.0 - tl.abs(u)))
            u = h + 1.0
            u = u - 6.0 * tl.floor(u * (1.0 / 6.0) + 1.0 / 3.0)
            g = _clip01(v - c * _clip01(2.0 - tl.abs(u)))
            u = h - 1.0
            u = u - 6.0 * tl.floor(u * (1.0 / 6.0) + 1.0 / 3.0)
            b = _clip01(v - c * _clip01(2.0 - tl.abs(u)))
        return r, g, b

    @triton.jit
    def _load_rgb(X, img, pix, mask, S, sb, sc, sy, sx):
        """The pixels `pix` (row-major index y * S + x) of image `img` of the uint8 batch X with strides (sb, sc, sy,
        sx), as three fp32 blocks in [0, 1]."""
        base = X + img.to(tl.int64) * sb + (pix // S) * sy + (pix % S) * sx
        r = tl.load(base, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        g = tl.load(base + sc, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        b = tl.load(base + 2 * sc, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0)
        return r, g, b

    @triton.jit
    def _stats(
        X,  # (B, 3, S, S) uint8 crops, strides (sb, sc, sy, sx) in elements
        Params,  # (B, N_PARAMS) float32 parameters, contiguous
        Orders,  # (24, 4) int32: op id at each slot
        Sums,  # (B, NB, 3) float32 out: per-block channel sums of the state just before contrast
        S, sb, sc, sy, sx,  # side, crop strides
        HW,  # S * S pixels per image
        NB: tl.constexpr,  # pixel blocks per image
        NPAR: tl.constexpr,  # N_PARAMS
        BLOCK: tl.constexpr,  # pixels per program
    ):
        img = tl.program_id(0)
        blk = tl.program_id(1)
        P = Params + img * NPAR
        pix = blk * BLOCK + tl.arange(0, BLOCK)
        mask = pix < HW
        r, g, b = _load_rgb(X, img, pix, mask, S, sb, sc, sy, sx)
        order = tl.load(P + _ORDER).to(tl.int32)
        before = (tl.load(P + _JITTER) > 0.5).to(tl.int32)  # 1 while still before contrast in the order (0: no jitter)
        for slot in tl.static_range(3):  # contrast is at slot 3 at the latest: at most 3 ops before it
            op = tl.load(Orders + order * 4 + slot)
            before = before * (op != 1).to(tl.int32)  # arithmetic, not a branch: one type for `before`
            if before != 0:
                r, g, b = _jitter_op(op, r, g, b, P, 0.0, 0.0, 0.0)
        out = Sums + (img * NB + blk) * 3
        tl.store(out + 0, tl.sum(tl.where(mask, r, 0.0), axis=0))
        tl.store(out + 1, tl.sum(tl.where(mask, g, 0.0), axis=0))
        tl.store(out + 2, tl.sum(tl.where(mask, b, 0.0), axis=0))

    @triton.jit
    def _finish_store(Out, img, pix, mask, HW, r, g, b, P, threshold, m0, m1, m2, s0, s1, s2):
        """Solarize (if the image's coin says so), clip, normalize, store NHWC in Out's dtype."""
        if tl.load(P + _SOLARIZE) > 0.5:
            r = tl.where(r < threshold, r, 1.0 - r)
            g = tl.where(g < threshold, g, 1.0 - g)
            b = tl.where(b < threshold, b, 1.0 - b)
        base = Out + img.to(tl.int64) * HW * 3 + pix * 3
        ty = Out.dtype.element_ty
        tl.store(base + 0, ((_clip01(r) - m0) / s0).to(ty), mask=mask)
        tl.store(base + 1, ((_clip01(g) - m1) / s1).to(ty), mask=mask)
        tl.store(base + 2, ((_clip01(b) - m2) / s2).to(ty), mask=mask)

    @triton.jit
    def _color(
        X,  # (B, 3, S, S) uint8 crops, strides (sb, sc, sy, sx)
        Params,  # (B, N_PARAMS) float32
        Orders,  # (24, 4) int32
        Sums,  # (B, NB, 3) float32 from _stats
        Scratch,  # (B, 3, S, S) float32 out: images with blur, after jitter and grayscale
        Out,  # (B, S, S, 3) out: finished images without blur (fp16 or fp32)
        S, sb, sc, sy, sx,  # side, crop strides
        HW, threshold, m0, m1, m2, s0, s1, s2,  # pixels per image, solarize threshold, normalization
        NB: tl.constexpr, NB_P2: tl.constexpr, NPAR: tl.constexpr, BLOCK: tl.constexpr,
        GW0: tl.constexpr, GW1: tl.constexpr, GW2: tl.constexpr,  # grayscale weights
    ):
        img = tl.program_id(0)
        blk = tl.program_id(1)
        P = Params + img * NPAR
        pix = blk * BLOCK + tl.arange(0, BLOCK)
        mask = pix < HW
        r, g, b = _load_rgb(X, img, pix, mask, S, sb, sc, sy, sx)
        if tl.load(P + _JITTER) > 0.5:  # jitter: contrast means from the NB partial sums of this image
            k = tl.arange(0, NB_P2)
            kmask = k < NB
            S3 = Sums + (img * NB + k) * 3
            inv = 1.0 / HW.to(tl.float32)
            mr = tl.sum(tl.load(S3 + 0, mask=kmask, other=0.0), axis=0) * inv
            mg = tl.sum(tl.load(S3 + 1, mask=kmask, other=0.0), axis=0) * inv
            mb = tl.sum(tl.load(S3 + 2, mask=kmask, other=0.0), axis=0) * inv
            order = tl.load(P + _ORDER).to(tl.int32)
            for slot in tl.static_range(4):
                op = tl.load(Orders + order * 4 + slot)
                r, g, b = _jitter_op(op, r, g, b, P, mr, mg, mb)
        if tl.load(P + _GRAY) > 0.5:  # grayscale
            y = GW0 * r + GW1 * g + GW2 * b
            r = y
            g = y
            b = y
        if tl.load(P + _BLUR) > 0.5:  # blur follows: to the planar scratch, clipped (the colour transform ends so)
            base = Scratch + img.to(tl.int64) * HW * 3 + pix
            tl.store(base, _clip01(r), mask=mask)
            tl.store(base + HW, _clip01(g), mask=mask)
            tl.store(base + 2 * HW, _clip01(b), mask=mask)
        else:
            _finish_store(Out, img, pix, mask, HW, r, g, b, P, threshold, m0, m1, m2, s0, s1, s2)

    @triton.jit
    def _taps_norm(sigma, K: tl.constexpr):
        """1 / sum of the unnormalized Gaussian taps exp(-t^2 / (2 sigma^2)), t = -K//2 .. K//2."""
        total = 0.0
        for k in tl.static_range(K):
            t = k - K // 2
            total += tl.exp(-(t * t) / (2.0 * sigma * sigma))
        return 1.0 / total

    @triton.jit
    def _blur_h(
        Scratch,  # (B, 3, S, S) float32 in
        Tmp,  # (B, 3, S, S) float32 out: horizontally blurred
        Params,  # (B, N_PARAMS) float32
        S,  # side
        NPAR: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        img = tl.program_id(0)
        P = Params + img * NPAR
        if tl.load(P + _BLUR) > 0.5:
            sigma = tl.load(P + _SIGMA)
            norm = _taps_norm(sigma, K)
            rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK_W)
            inside = (rows < S)[:, None] & (cols < S)[None, :]
            for c in tl.static_range(3):
                plane = img.to(tl.int64) * 3 * S * S + c * S * S
                acc = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
                for k in tl.static_range(K):
                    t = k - K // 2
                    w = tl.exp(-(t * t) / (2.0 * sigma * sigma)) * norm
                    src = cols + t
                    m = (rows < S)[:, None] & ((src >= 0) & (src < S))[None, :]  # zero padding
                    acc += w * tl.load(Scratch + plane + rows[:, None] * S + src[None, :], mask=m, other=0.0)
                tl.store(Tmp + plane + rows[:, None] * S + cols[None, :], acc, mask=inside)

    @triton.jit
    def _blur_v(
        Tmp,  # (B, 3, S, S) float32 in: horizontally blurred
        Out,  # (B, S, S, 3) out (fp16 or fp32)
        Params,  # (B, N_PARAMS) float32
        S, threshold, m0, m1, m2, s0, s1, s2,
        NPAR: tl.constexpr, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        img = tl.program_id(0)
        P = Params + img * NPAR
        if tl.load(P + _BLUR) > 0.5:
            sigma = tl.load(P + _SIGMA)
            norm = _taps_norm(sigma, K)
            rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK_W)
            inside = (rows < S)[:, None] & (cols < S)[None, :]
            r = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            g = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            b = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
            plane = img.to(tl.int64) * 3 * S * S
            for k in tl.static_range(K):
                t = k - K // 2
                w = tl.exp(-(t * t) / (2.0 * sigma * sigma)) * norm
                src = rows + t
                m = ((src >= 0) & (src < S))[:, None] & (cols < S)[None, :]  # zero padding
                off = plane + src[:, None] * S + cols[None, :]
                r += w * tl.load(Tmp + off, mask=m, other=0.0)
                g += w * tl.load(Tmp + off + S * S, mask=m, other=0.0)
                b += w * tl.load(Tmp + off + 2 * S * S, mask=m, other=0.0)
            pix = rows[:, None] * S + cols[None, :]
            _finish_store(Out, img, pix, inside, S * S, r, g, b, P, threshold, m0, m1, m2, s0, s1, s2)


_orders_cache: dict[torch.device, torch.Tensor] = {}


def _orders(device: torch.device) -> torch.Tensor:
    if device not in _orders_cache:
        _orders_cache[device] = torch.tensor(ORDERS, dtype=torch.int32, device=device)
    return _orders_cache[device]


def photometric_launches(B: int, S: int, blur_window: int, out_dtype: str = "fp16", on_gpu: bool = True,
                         blur_rows: int | None = None, blur_warps: int = 4) -> dict[str, dict]:
    """How photometric_triton launches its four kernels for B images of S x S: per kernel its grid, constexprs,
    num_warps, num_stages and signature (Triton types of the runtime arguments). The launcher uses exactly this;
    the ahead-of-time compile check (fastbyol.tools.gpu_compile) compiles exactly this, so the two cannot drift.

    blur_rows: rows per blur program (default: 2 on the GPU at BLOCK_W 256, so that `_blur_v`'s three (ROWS, BLOCK_W)
    fp32 accumulators stay in registers: at 8 rows, 4 warps, it hits 255 registers and spills on sm_90 under Triton
    3.6 and 3.9 (benchmarks/results/*-gpu-compile.json)). The GPU plan times the other clean candidates."""
    HW = S * S
    BLOCK = 1024 if on_gpu else min(4096, next_power_of_2(HW))  # one big block per image under the interpreter
    NB = -(-HW // BLOCK)
    BLOCK_W = next_power_of_2(S)
    if blur_rows is None:
        blur_rows = max(1, 512 // BLOCK_W) if on_gpu else next_power_of_2(S)
    crop = dict(X="*u8", Params="*fp32", Orders="*i32", Sums="*fp32")
    ints = {k: "i32" for k in ("S", "sb", "sc", "sy", "sx", "HW")}
    norm = {"threshold": "fp32", **{f"{c}{i}": "fp32" for c in "ms" for i in range(3)}}
    out = f"*{out_dtype}"
    blur = dict(NPAR=N_PARAMS, K=blur_window, ROWS=blur_rows, BLOCK_W=BLOCK_W)
    blur_grid = (B, -(-S // blur_rows))
    from fastbyol.augment.photometric import GRAY_WEIGHTS

    return {
        # _stats at 8 warps (4 pixels a thread): at 4 warps (8 a thread) it spills 8 B on sm_90 under Triton 3.6;
        # BLOCK stays 1024, so NB and the partial-sum layout _color reads are those of every other launch
        "_stats": dict(grid=(B, NB), constexprs=dict(NB=NB, NPAR=N_PARAMS, BLOCK=BLOCK), num_warps=STATS_WARPS,
                       num_stages=3, signature={**crop, **ints}),
        "_color": dict(grid=(B, NB), constexprs=dict(NB=NB, NB_P2=max(2, next_power_of_2(NB)), NPAR=N_PARAMS,
                                                     BLOCK=BLOCK, GW0=GRAY_WEIGHTS[0], GW1=GRAY_WEIGHTS[1],
                                                     GW2=GRAY_WEIGHTS[2]),
                       num_warps=4, num_stages=3,
                       signature={**crop, "Scratch": "*fp32", "Out": out, **ints, **norm}),
        "_blur_h": dict(grid=blur_grid, constexprs=blur, num_warps=4, num_stages=3,
                        signature=dict(Scratch="*fp32", Tmp="*fp32", Params="*fp32", S="i32")),
        "_blur_v": dict(grid=blur_grid, constexprs=blur, num_warps=blur_warps, num_stages=3,
                        signature=dict(Tmp="*fp32", Out=out, Params="*fp32", S="i32", **norm)),
    }


STATS_WARPS = 8  # _stats' warps: 4 pixels a thread at BLOCK 1024 (benchmarks/results/2026-12-03/gpu-compile.md)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


_BLUR_LAUNCH: dict[str, int] = {}  # set_blur_launch: the GPU plan's candidates (empty: photometric_launches' rule)


def set_blur_launch(rows: int | None = None, warps: int = 4) -> None:
    """Launch the blur kernels at `rows` rows per program and `warps` warps (None: the default rule). The GPU plan
    times the spill-free candidates with this and keeps the fastest; the results are the same at every setting."""
    _BLUR_LAUNCH.clear()
    if rows is not None:
        _BLUR_LAUNCH.update(blur_rows=rows, blur_warps=warps)


_TRITON_DTYPES = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}


def photometric_triton(crops: torch.Tensor, params: torch.Tensor, spec: ChainSpec, *,
                       buffers: ScratchBuffers | None = None) -> torch.Tensor:
    """The chain in four Triton launches (see the module docstring); crops, params and spec as
    fastbyol.augment.photometric.photometric. Of the spec, gray_input, blur_tail and chunk_pixels are the reference's
    (the colour arithmetic leaves gray pixels exact, every tap is kept, there are no chunks). buffers: where the
    partial sums, scratch and tmp live (reused call after call on one stream; None: fresh ones each call). The output
    is always fresh: the caller keeps it. CPU tensors need TRITON_INTERPRET=1 (tests)."""
    if not triton_available():
        raise RuntimeError("the Triton photometric chain needs triton")
    if crops.device.type != "cuda" and not interpreter_on():
        raise RuntimeError("photometric_triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    check_chain_inputs(crops, params)
    if params.dtype != torch.float32 or not params.is_contiguous():
        raise ValueError("photometric_triton needs contiguous float32 params")
    blur_window, out_dtype = spec.blur_window, spec.out_dtype
    if blur_window % 2 != 1:
        raise ValueError(f"blur_window must be odd, got {blur_window}")
    B, S = crops.shape[0], crops.shape[2]
    HW = S * S
    device = crops.device
    L = photometric_launches(B, S, blur_window, _TRITON_DTYPES.get(out_dtype, "fp32"), device.type == "cuda",
                             **_BLUR_LAUNCH)
    NB = L["_stats"]["constexprs"]["NB"]
    # every element a kernel reads was written by this call's kernels first (_color's blurred images to scratch,
    # _blur_h those images' planes to tmp), so reused buffers need no clearing
    buf = buffers if buffers is not None else ScratchBuffers()
    sums = buf.get("sums", (B, NB, 3), torch.float32, device)
    scratch = buf.get("scratch", (B, 3, S, S), torch.float32, device)
    tmp = buf.get("tmp", (B, 3, S, S), torch.float32, device)
    out = torch.empty((B, S, S, 3), dtype=out_dtype, device=device)  # NHWC memory
    orders = _orders(device)
    m, s = [float(v) for v in spec.mean], [float(v) for v in spec.std]
    thr = float(spec.solarize_threshold)
    strides = (S, *crops.stride())

    def launch(kernel, *args):
        c = L[kernel.__name__]
        kernel[c["grid"]](*args, **c["constexprs"], num_warps=c["num_warps"], num_stages=c["num_stages"])

    launch(_stats, crops, params, orders, sums, *strides, HW)
    launch(_color, crops, params, orders, sums, scratch, out, *strides, HW, thr, *m, *s)
    launch(_blur_h, scratch, tmp, params, S)
    launch(_blur_v, tmp, out, params, S, thr, *m, *s)
    return out.permute(0, 3, 1, 2)
