"""The photometric chain's three forms agree: the torch reference (grouped by jitter order, the CPU path), the
per-slot form torch.compile gets, and the Triton kernel (under TRITON_INTERPRET=1 here; compiled for sm_90 in a
subprocess so a kernel that would not build on the GPU fails here too). The reference's fidelity to the official ops
is tests/test_augment_fidelity.py's job; here the oracle is the reference in float64.

Tolerances (outputs are normalized, |values| <= ~2.7): float32 against the float64 oracle 3e-5; fp16 outputs 2e-3
(half an fp16 ulp at 2.7 is 1e-3, plus the float32 error).
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastbyol.augment import IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2, sample_params
from fastbyol.augment.photometric import (N_PARAMS, ORDERS, PARAM_NAMES, ChainSpec, photometric,
                                          photometric_by_slot)
from fastbyol.augment.photometric_backends import photometric_backend

F64 = dict(compute_dtype=torch.float64)  # the reference as the oracle (with a spec of out_dtype float64)
SHAPES = [(1, 8), (7, 31), (30, 16)]  # one image; a prime batch and an odd side; every order in one batch


def _inputs(batch, size, spec=VIEW2, seed=0, gray=False):
    """Fresh random crops and parameters, every order and each coin on and off spread over the batch."""
    g = torch.Generator().manual_seed(seed)
    crops = torch.randint(0, 256, (batch, 1 if gray else 3, size, size), dtype=torch.uint8, generator=g)
    crops = crops.expand(-1, 3, -1, -1).contiguous()  # planar, as DALI emits them
    p = sample_params(spec, batch, g)
    p[:, PARAM_NAMES.index("order")] = torch.randperm(batch, generator=g) % len(ORDERS)
    for k, name in enumerate(("jitter", "gray", "blur", "solarize")):
        p[:, PARAM_NAMES.index(name)] = (torch.rand(batch, generator=g) < 0.5).float()
    return crops, p


def _window(size):
    official = dataclasses.replace(VIEW1, blur_window_rule="official")  # 10% of the side
    return max(3, official.blur_window(size))  # 3 taps at least, so the blur does something at tiny sizes


def _spec(blur_window, solarize_threshold=0.5, **changes):
    """A view's chain constants, ImageNet's normalization."""
    return ChainSpec(blur_window=blur_window, solarize_threshold=solarize_threshold, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, **changes)


def _f64(spec):
    return dataclasses.replace(spec, out_dtype=torch.float64)


@pytest.mark.parametrize("batch, size", SHAPES)
def test_reference_float32_against_float64(batch, size):
    crops, p = _inputs(batch, size)
    got = photometric(crops, p, _spec(_window(size)))
    want = photometric(crops, p, _f64(_spec(_window(size))), **F64)
    assert got.shape == (batch, 3, size, size) and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=0)


def test_chunks_and_worker_threads_do_not_change_a_bit():
    crops, p = _inputs(40, 24)
    base = photometric(crops, p, _spec(5))
    for chunk_pixels, threads in ((1, None), (1 << 30, None), (_spec(5).chunk_pixels, 2), (1, 3)):
        got = photometric(crops, p, _spec(5, chunk_pixels=chunk_pixels), threads=threads)
        assert torch.equal(got, base), (chunk_pixels, threads)


def test_several_batches_at_once_equal_one_at_a_time():
    from fastbyol.augment.photometric import photometric_many

    jobs = []
    for seed, spec in ((1, VIEW1), (2, VIEW2)):
        crops, p = _inputs(20, 18, spec, seed=seed)
        jobs.append((crops, p, _spec(5, spec.solarize_threshold)))
    together = photometric_many(jobs, threads=2)
    for job, got in zip(jobs, together):
        assert torch.equal(got, photometric(*job))


def test_each_image_is_processed_independently_of_its_batch():
    crops, p = _inputs(12, 20)
    whole = photometric(crops, p, _spec(5))
    for i in (0, 5, 11):
        alone = photometric(crops[i:i + 1], p[i:i + 1], _spec(5))
        torch.testing.assert_close(alone[0], whole[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec", [VIEW1, VIEW2], ids=["view1", "view2"])
def test_gray_input_path_equals_the_colour_path_on_gray_crops(spec):
    crops, p = _inputs(30, 20, spec, gray=True)
    colour = photometric(crops, p, _spec(5))
    gray = photometric(crops, p, _spec(5, gray_input=True))
    torch.testing.assert_close(gray, colour, atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch, size", SHAPES)
def test_per_slot_form_matches_the_reference(batch, size):
    crops, p = _inputs(batch, size, seed=3)
    want = photometric(crops, p, _f64(_spec(_window(size))), **F64)
    got = photometric_by_slot(crops, p, _spec(_window(size)))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=0)


@pytest.mark.parametrize("out_dtype, atol", [(torch.float32, 3e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("batch, size", SHAPES)
def test_triton_kernel_matches_the_reference(batch, size, out_dtype, atol):
    pytest.importorskip("triton")
    from fastbyol.kernels.photometric import photometric_triton

    crops, p = _inputs(batch, size, seed=5)
    for spec in (VIEW1, VIEW2):
        chain = _spec(_window(size), spec.solarize_threshold)
        want = photometric(crops, p, _f64(chain), **F64)
        got = photometric_triton(crops, p, dataclasses.replace(chain, out_dtype=out_dtype))
        assert got.dtype == out_dtype and got.shape == (batch, 3, size, size)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_triton_kernel_reused_buffers_change_nothing():
    """The loader's ScratchBuffers: reused (and poisoned with NaN in between, so a read before a write would show),
    shrunk into and grown, the output equals a fresh-buffer call bit for bit and the float64 reference; storages are
    made only when a shape needs more."""
    pytest.importorskip("triton")
    from fastbyol.kernels.photometric import photometric_triton
    from fastbyol.augment.photometric import ScratchBuffers

    buf = ScratchBuffers()
    allocations = []
    for (batch, size), seed in (((7, 13), 1), ((3, 9), 2), ((7, 13), 3), ((9, 13), 4)):
        crops, p = _inputs(batch, size, seed=seed)
        p[0, PARAM_NAMES.index("blur")] = 1.0
        chain = _spec(_window(size))
        for t in buf._flat.values():
            t.fill_(float("nan"))
        got = photometric_triton(crops, p, chain, buffers=buf)
        assert torch.equal(got, photometric_triton(crops, p, chain))
        want = photometric(crops, p, _f64(chain), **F64)
        torch.testing.assert_close(got.double(), want, atol=3e-5, rtol=0)
        allocations.append(buf.allocations)
    assert allocations == [3, 3, 3, 6]  # sums, scratch, tmp; regrown only for the larger batch
    assert buf.nbytes() >= 2 * 9 * 3 * 13 * 13 * 4


def test_triton_kernel_other_threshold_and_no_blur_anywhere():
    pytest.importorskip("triton")
    from fastbyol.kernels.photometric import photometric_triton

    crops, p = _inputs(9, 12, seed=6)
    p[:, PARAM_NAMES.index("blur")] = 0.0
    p[:, PARAM_NAMES.index("solarize")] = 1.0
    want = photometric(crops, p, _spec(3, 0.3), **F64)
    got = photometric_triton(crops, p, _spec(3, 0.3))
    torch.testing.assert_close(got.double(), want.double(), atol=3e-5, rtol=0)


_AOT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fastbyol.kernels.photometric as kp
    norm = {f"{c}{i}": "fp32" for c in "ms" for i in range(3)}
    crop_strides = {k: "i32" for k in ("S", "sb", "sc", "sy", "sx")}
    launches = [
        (kp._stats, dict(X="*u8", Params="*fp32", Orders="*i32", Sums="*fp32", **crop_strides, HW="i32"),
         dict(NB=4, NPAR=10, BLOCK=256)),
        (kp._color, dict(X="*u8", Params="*fp32", Orders="*i32", Sums="*fp32", Scratch="*fp32", Out="*fp16",
                         **crop_strides, HW="i32", threshold="fp32", **norm),
         dict(NB=4, NB_P2=4, NPAR=10, BLOCK=256, GW0=0.2989, GW1=0.587, GW2=0.114)),
        (kp._blur_h, dict(Scratch="*fp32", Tmp="*fp32", Params="*fp32", S="i32"),
         dict(NPAR=10, K=5, ROWS=8, BLOCK_W=32)),
        (kp._blur_v, dict(Tmp="*fp32", Out="*fp16", Params="*fp32", S="i32", threshold="fp32", **norm),
         dict(NPAR=10, K=5, ROWS=8, BLOCK_W=32)),
    ]
    for fn, sig, consts in launches:
        sig = {**sig, **{k: "constexpr" for k in consts}}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn.__name__
    print("compiled", len(launches))
""")


def test_triton_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter runs the kernels as Python and forgives what the compiler refuses (a variable changing type
    in a branch, ...): compile all four to a Hopper cubin, in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled 4" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_compiled_backend_matches_the_reference():
    """torch.compile of the per-slot form (what the GPU's "compiled" backend runs), here by Inductor's CPU backend."""
    crops, p = _inputs(6, 16, seed=8)
    want = photometric(crops, p, _spec(3), **F64)
    got = photometric_backend("compiled")(crops, p, _spec(3))
    torch.testing.assert_close(got.double(), want.double(), atol=3e-5, rtol=0)


def test_bad_inputs_raise_one_clear_error():
    crops, p = _inputs(4, 8)
    with pytest.raises(ValueError, match="crops must be uint8"):
        photometric(crops.float(), p, _spec(3))
    with pytest.raises(ValueError, match=r"crops must be uint8 \(B, 3, S, S\)"):
        photometric(crops.permute(0, 2, 3, 1), p, _spec(3))
    with pytest.raises(ValueError, match=f"params must be \\(4, {N_PARAMS}\\)"):
        photometric(crops, p[:, :5], _spec(3))
    with pytest.raises(ValueError, match="not one of"):
        photometric_backend("fast")


def test_any_crop_layout_gives_the_same_views():
    """Planar crops (DALI's) and an NHWC batch seen as (B, 3, S, S) give the same result, in every form."""
    crops, p = _inputs(6, 20, seed=9)
    nhwc = crops.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, channels_last strides
    base = photometric(crops, p, _spec(5))
    assert torch.equal(photometric(nhwc, p, _spec(5)), base)
    torch.testing.assert_close(photometric_by_slot(nhwc, p, _spec(5)), base, atol=3e-5, rtol=0)
    pytest.importorskip("triton")
    from fastbyol.kernels.photometric import photometric_triton

    got = photometric_triton(nhwc, p, _spec(5))
    torch.testing.assert_close(got, base, atol=3e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch, size", [(64, 32), (16, 224), (7, 31)])
def test_cuda_backends_match_the_reference(batch, size):
    """reference, triton and compiled on the GPU against the float64 CPU oracle, fp32 and fp16 outputs, every order
    and coin; crops planar (DALI's) and NHWC-strided."""
    from fastbyol.kernels.photometric import photometric_triton

    crops, p = _inputs(batch, size, seed=11)
    for spec in (VIEW1, VIEW2):
        chain = _spec(_window(size), spec.solarize_threshold)
        want = photometric(crops, p, _f64(chain), **F64)
        for backend in ("reference", "triton", "compiled"):
            for out_dtype, atol in ((torch.float32, 5e-5), (torch.float16, 2e-3)):
                got = photometric_backend(backend)(crops.cuda(), p.cuda(),
                                                   dataclasses.replace(chain, out_dtype=out_dtype))
                assert got.is_cuda and got.dtype == out_dtype and got.is_contiguous(memory_format=torch.channels_last)
                torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=0, msg=backend)
        nhwc = crops.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).cuda()
        got = photometric_triton(nhwc, p.cuda(), chain)
        torch.testing.assert_close(got.double().cpu(), want, atol=5e-5, rtol=0)
