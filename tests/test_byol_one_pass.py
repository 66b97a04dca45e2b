"""BYOL's one-pass forward (both views stacked, per-view BN statistics) against its reference, one pass per view
(`BYOL.forward_per_view`, the forward of the four-pass step), in float64: outputs, every gradient, running statistics;
on one process and on 2 and 4 gloo processes (cross-replica BN, DDP around the online network,
`fastbyol.system.data_parallel.wrap_online`), eager and compiled per network (`compile_networks`); no recompile after
the first step (Dynamo's counters, aot_eager and Inductor); the 1x1 weights' gradients are DDP's bucket views under
compile; bf16 gradient compression stays close to fp32.
"""

import copy
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fastbyol.kernels import byol_loss_symmetric

from fastbyol.models import BYOL, build_encoder
from fastbyol.models.networks import compile_networks
from fastbyol.system.batchnorm import convert_batchnorm
from fastbyol.system.data_parallel import wrap_online
from fastbyol.system.distributed import close_distributed, init_distributed

from .support import spawn_ranks

B, STEPS = 3, 2  # images per view per process (prime), steps


def _model(arch: str = "resnet-tiny", dtype=torch.float64) -> BYOL:
    torch.manual_seed(0)
    model = BYOL(build_encoder(arch, stem="small-s2", image_size=16), 32, 16, 32)
    return model.to(dtype=dtype, memory_format=torch.channels_last)


def _views(n: int, step: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    v1, v2 = (torch.randn(n, 3, 16, 16, generator=gen, dtype=dtype) + off for off in (0.5, -0.5))
    return v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)


def _steps(model: BYOL, forward, rows: slice = slice(None), world: int = 1, tau: float = 0.9,
           steps: int = STEPS) -> dict:
    """STEPS of: forward, the symmetric loss, backward, an SGD step, the EMA (plain torch: every value is compared,
    so nothing here may differ between the two forwards but the forward)."""
    outs = []
    for step in range(steps):
        v1, v2 = (v[rows] for v in _views(B * world, step, next(model.parameters()).dtype))
        model.zero_grad(set_to_none=world == 1)  # under DDP, as byol_step: its buckets' views, zeroed in place
        out = forward(v1, v2)
        loss = byol_loss_symmetric(*out[:4]) + 1e-3 * out[4].square().sum()  # h1 carries no gradient: detached
        loss.backward()
        outs.append([o.detach().clone() for o in out])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in model.online_parameters():
                p.sub_(0.1 * p.grad)
            for t, o in zip(*model.ema_pairs()):
                t.lerp_(o, 1 - tau)
    return {"outs": outs, "grads": grads, "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _assert_same(got: dict, ref: dict, rtol=1e-10, atol=1e-12) -> None:
    for step, (a, b) in enumerate(zip(got["outs"], ref["outs"])):
        for i, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol,
                                       msg=lambda m, s=step, i=i: f"step {s}, output {i}: {m}")
    assert set(got["grads"]) == set(ref["grads"]) and len(ref["grads"]) > 10
    for kind in ("grads", "buffers", "params"):
        for name, value in ref[kind].items():
            torch.testing.assert_close(got[kind][name], value, rtol=rtol, atol=atol,
                                       msg=lambda m, k=kind, n=name: f"{k} {n}: {m}")


@pytest.mark.parametrize("arch", ["resnet-tiny", "vit-tiny-cpu"])
def test_one_pass_equals_one_pass_per_view_in_float64(arch):
    model = _model(arch)
    ref_model = copy.deepcopy(model)
    assert model.one_pass
    got, ref = _steps(model, model), _steps(ref_model, ref_model.forward_per_view)
    _assert_same(got, ref)
    if arch == "resnet-tiny":
        bn = model.online_encoder.bn1
        assert bn.num_batches_tracked == 2 * STEPS and bn.views == 1  # a view is one update; told 1 after
        assert ref["buffers"]["predictor.1.running_var"].ne(1).all()


def test_an_encoder_with_another_batch_norm_goes_per_view():
    class BatchNormAct(nn.BatchNorm2d):  # a BN subclass, left as it is: it cannot split views
        def forward(self, x):
            return super().forward(x).relu()

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), BatchNormAct(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = BYOL(encoder, 32, 16, 32).double()
    ref_model = copy.deepcopy(model)
    assert not model.one_pass
    _assert_same(_steps(model, model), _steps(ref_model, ref_model.forward_per_view))


@pytest.mark.parametrize("arch, backend, graphs", [("resnet-tiny", "aot_eager", 2), ("resnet-tiny", "inductor", 2),
                                                    ("resnet18", "aot_eager", 14)])
def test_compiled_networks_equal_eager_and_compile_only_in_the_first_step(arch, backend, graphs):
    """resnet-tiny (one block a stage) is compiled whole: the online network's training graph and the target's
    no-grad graph. resnet18 repeats its blocks and is compiled block by block: its 7 block shapes, each once for the
    online network and once for the target (16 block calls a step). After the first step nothing compiles again."""
    from torch._dynamo.utils import counters

    from fastbyol.models.networks import repeated_blocks

    torch._dynamo.reset()
    model, ref_model = _model(arch), _model(arch)
    names = list(model.state_dict())
    net = compile_networks(model, "default", backend=backend)
    counters.clear()
    got = _steps(model, net, steps=1)
    first, recompiled = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    more = _steps(model, net)  # more steps: nothing compiles again
    model.online_encoder.eval()  # an evaluation (the kNN check) at another batch size: eager, nothing compiles
    with torch.no_grad():
        model.online_encoder(_views(5, 0)[0])
    model.online_encoder.train()
    assert counters["stats"]["unique_graphs"] == first == graphs, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == recompiled and not counters["graph_break"], (
        dict(counters["recompiles"]), dict(counters["graph_break"]))
    # float64: the compiled graphs sum in another order (decomposed BN backward), ~1e-9 of a value; a wrong graph is
    # off by far more (float32 alone would be ~1e-6)
    _assert_same(got, _steps(ref_model, ref_model, steps=1), rtol=1e-8, atol=1e-10)
    assert more["outs"][0][0].ne(got["outs"][0][0]).any()  # the steps did move the model
    assert list(model.state_dict()) == names  # compiled in place: no name changed
    blocks = repeated_blocks(model.online_encoder)
    assert len(blocks) == (8 if arch == "resnet18" else 0)
    compile_networks(model, "off")  # undone (the trainer's fallback): every block's own forward again
    assert not any("forward" in vars(b) for b in blocks)


def _dist_worker(rank: int, world: int, port: int, out_path: str, backend: str | None, arch: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_distributed("cpu")
    import torch.distributed as dist

    rows = slice(rank * B, (rank + 1) * B)
    settings = SimpleNamespace(bn_group=0, grad_reduce="fp32", bucket_mb=0.0)  # the trainer's defaults
    model = _model(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = compile_networks(model, "off" if backend is None else "default", backend or "inductor",
                               online=wrap_online(model, torch.device("cpu"), settings))
        got = _steps(model, net, rows, world)
    got["bucket_views"] = [(p.grad._base is not None, p.grad.stride() == p.stride()) for p in model.online_parameters()]
    got["stride_warnings"] = [str(w.message) for w in caught if "stride" in str(w.message).lower()]
    # the reference: one pass per view, the same cross-replica BN, the gradients averaged by hand
    ref_model = convert_batchnorm(_model(arch), "cpu")
    ref = {"outs": [], "grads": {}}
    for step in range(STEPS):
        v1, v2 = (v[rows] for v in _views(B * world, step))
        ref_model.zero_grad(set_to_none=True)
        out = ref_model.forward_per_view(v1, v2)
        (byol_loss_symmetric(*out[:4]) + 1e-3 * out[4].square().sum()).backward()
        for p in ref_model.online_parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
        ref["outs"].append([o.detach().clone() for o in out])
        ref["grads"] = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in ref_model.online_parameters():
                p.sub_(0.1 * p.grad)
            for t, o in zip(*ref_model.ema_pairs()):
                t.lerp_(o, 1 - 0.9)
    ref["buffers"] = {n: b.clone() for n, b in ref_model.named_buffers()}
    ref["params"] = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    # bf16 gradient compression: close to the fp32 all-reduce (2 processes)
    if world == 2 and backend is None:
        bf16_model = _model(dtype=torch.float32)
        bf16 = compile_networks(bf16_model, online=wrap_online(bf16_model, torch.device("cpu"), SimpleNamespace(
            bn_group=0, grad_reduce="bf16", bucket_mb=1.0)))
        fp32_model = _model(dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:  # float32: the convolutions' own backward (oneDNN)
            warnings.simplefilter("always")
            fp32 = compile_networks(fp32_model, online=wrap_online(fp32_model, torch.device("cpu"), settings))
            got["bf16"] = [_steps(m, n, rows, world, steps=1)["grads"]
                           for m, n in ((bf16_model, bf16), (fp32_model, fp32))]
        got["stride_warnings"] += [str(w.message) for w in caught if "stride" in str(w.message).lower()]
        got["bucket_views"] += [(p.grad._base is not None, p.grad.stride() == p.stride())
                                for p in fp32_model.online_parameters()]
    torch.save({"got": got, "ref": ref}, f"{out_path}.{rank}")
    dist.barrier()
    close_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("world, backend, arch", [(2, None, "resnet-tiny"), (4, None, "resnet-tiny"),
                                                  (2, "aot_eager", "resnet-tiny"), (2, "aot_eager", "resnet18")])
def test_one_pass_over_ranks_equals_one_pass_per_view(tmp_path, world, backend, arch):
    """resnet-tiny compiles whole (DDP compiled with the online network); resnet18 block by block inside an eager
    DDP module, as ResNet-50 on GPUs."""
    out = tmp_path / "dist"
    for saved in spawn_ranks(_dist_worker, world, out, backend, arch):
        got, ref = saved["got"], saved["ref"]
        tol = dict(rtol=1e-10, atol=1e-12) if backend is None else dict(rtol=1e-8, atol=1e-10)  # see above
        _assert_same(got, ref, **tol)
        # DDP's buckets: every gradient is a view of one, with its parameter's strides (no copy into the buckets)
        assert got["bucket_views"] and all(view and strides for view, strides in got["bucket_views"])
        assert not got["stride_warnings"], got["stride_warnings"]
        if "bf16" in got:
            bf16, fp32 = got["bf16"]
            for name, g in fp32.items():  # the first step's gradients: bf16's 8-bit mantissa, ~0.4% a value
                assert (bf16[name] - g).norm() <= 1e-2 * g.norm() + 1e-6, name
            assert any(not torch.equal(bf16[n], g) for n, g in fp32.items())  # the hook did round

