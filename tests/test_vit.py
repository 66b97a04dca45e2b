"""Vision Transformers: timm's names, shapes and parameter counts, attention against a float64 reference, BYOL steps,
the optimizer exclusions, FLOPs, torch.compile(fullgraph=True), bf16, and an exact resume after SIGKILL."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastbyol.config import Config
from fastbyol.models import ARCHS, BYOL, VisionTransformer, build_encoder
from fastbyol.models.vit import Attention
from fastbyol.optim import LARS, AdamW, build_optimizer, excluded_parameters
from fastbyol.run.perf import flops_per_image
from fastbyol.reference import lars_update_
from fastbyol.train import byol_step

from .backbone_runs import kill_and_resume

KEYS = json.loads((Path(__file__).parent / "fixtures" / "backbone_keys.json").read_text())
VITS = [name for name, arch in ARCHS.items() if arch.family == "vit"]
# timm's counts with the 1000-class head (timm.create_model(name).num_params)
TIMM_PARAMS = {"vit_small_patch16": 22_050_664, "vit_base_patch16": 86_567_656}


def _meta(arch: str, size: int = 224):
    with torch.device("meta"):
        return build_encoder(arch, image_size=size)


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch,count", TIMM_PARAMS.items())
def test_parameter_counts_match_timm(arch, count):
    enc = _meta(arch)
    head = enc.num_features * 1000 + 1000  # timm's Linear head
    assert sum(p.numel() for p in enc.parameters()) + head == count


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_state_dict_is_timms_except_the_head(size):
    timm_keys = {k: tuple(s) for k, s in KEYS["timm"][f"vit_{size}_patch16_224"]}
    ours = _shapes(_meta(f"vit_{size}_patch16"))
    assert set(timm_keys) - set(ours) == {"head.weight", "head.bias"}  # strict load except the head
    assert ours == {k: s for k, s in timm_keys.items() if not k.startswith("head.")}
    assert list(ours) == [k for k in timm_keys if not k.startswith("head.")]  # same order too
    assert KEYS["versions"]["timm"]  # the fixture says which timm it came from


def _attention_reference(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v, per head."""
    b, n, d = x.shape
    q, k, v = (x @ qkv_w.T + qkv_b).split(d, dim=-1)
    split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (att @ v).transpose(1, 2).reshape(b, n, d) @ proj_w.T + proj_b


@pytest.mark.parametrize("b,n,d,heads", [(1, 5, 12, 3), (3, 17, 24, 2), (2, 31, 16, 4)])
def test_attention_matches_the_written_out_reference_float64(b, n, d, heads):
    att = Attention(d, heads).double()
    for p in att.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    ref_params = [p.detach().clone().requires_grad_(True) for p in (att.qkv.weight, att.qkv.bias, att.proj.weight,
                                                                   att.proj.bias)]
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = att(x), _attention_reference(x_ref, *ref_params, heads)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)
    for p, r in zip((att.qkv.weight, att.qkv.bias, att.proj.weight, att.proj.bias), ref_params):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-10, rtol=1e-10)


def test_feature_is_the_class_token_after_the_final_norm():
    enc = VisionTransformer(image_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    tokens = torch.cat([enc.cls_token.expand(3, -1, -1), enc.patch_embed(x)], dim=1) + enc.pos_embed
    torch.testing.assert_close(enc(x), enc.norm(enc.blocks(tokens))[:, 0])
    # another input side resamples pos_embed (the kNN monitor reads the data at its own size)
    assert enc(torch.randn(2, 3, 28, 28, dtype=torch.float64)).shape == (2, 24)
    torch.testing.assert_close(enc.position_embedding((4, 4)), enc.pos_embed)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if "small" in a else a
                                  for a in VITS if a != "vit_base_patch16"])
def test_byol_step_forward_backward_on_cpu(arch):
    size = 16 if "patch16" in arch else 8  # 1 or 4 patches: the whole depth and width, little arithmetic
    model = BYOL(build_encoder(arch, image_size=size), 64, 32, 64)
    cfg = Config()
    cfg.optim.optimizer = "adamw"
    opt = build_optimizer(cfg.optim, model)
    target, online = model.ema_pairs()
    before = [p.detach().clone() for p in online]
    v1, v2 = torch.randn(3, 3, size, size), torch.randn(3, 3, size, size)
    loss = byol_step(model, opt, (target, online), (v1, v2), lr=1e-3, tau=0.99)
    assert torch.isfinite(loss) and 0 < loss.item() <= 8
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in online)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, online))


def test_vit_base_byol_step_shapes_on_meta():
    model = BYOL(_meta("vit_base_patch16", 32), 64, 32, 64).to("meta")
    p1, p2, z1, z2, h1 = model(torch.empty(2, 3, 32, 32, device="meta"), torch.empty(2, 3, 32, 32, device="meta"))
    assert p1.shape == z2.shape == (2, 32) and h1.shape == (2, 768)
    (p1.sum() + p2.sum()).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.online_parameters())


def test_exclusions_are_norms_biases_pos_embed_and_cls_token():
    model = BYOL(build_encoder("vit-tiny-cpu", image_size=16), 64, 32, 64)
    names = [n for n, _ in model.named_parameters() if not n.startswith("target_")]
    flags = dict(zip(names, excluded_parameters(model)))
    assert flags["online_encoder.pos_embed"] and flags["online_encoder.cls_token"]
    assert flags["online_encoder.blocks.0.norm1.weight"] and flags["online_encoder.blocks.0.attn.qkv.bias"]
    assert flags["online_projector.1.weight"]  # the heads' BN
    assert not flags["online_encoder.blocks.0.attn.qkv.weight"] and not flags["online_encoder.patch_embed.proj.weight"]
    assert not flags["predictor.0.weight"]
    assert sum(flags.values()) == sum(p.ndim <= 1 for p in model.online_parameters()) + 2


def test_lars_on_a_vit_follows_its_exclusions_float64():
    model = BYOL(build_encoder("vit-tiny-cpu", image_size=16), 64, 32, 64).double()
    opt = build_optimizer(Config().optim, model)
    assert isinstance(opt, LARS) and [g["exclude"] for g in opt.param_groups] == [False, True]
    params = model.online_parameters()
    for p in params:
        p.grad = torch.randn_like(p)
    ref = [p.detach().clone() for p in params]
    opt.set_lr(0.5)
    opt.step()
    lars_update_(ref, [p.grad for p in params], [torch.zeros_like(p) for p in params], lr=0.5, weight_decay=1e-6,
                 excluded=excluded_parameters(model))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, atol=1e-12, rtol=1e-12)


def test_adamw_decays_only_what_is_not_excluded():
    model = BYOL(build_encoder("vit-tiny-cpu", image_size=16), 64, 32, 64)
    cfg = Config()
    cfg.optim.optimizer, cfg.optim.weight_decay = "adamw", 0.1
    opt = build_optimizer(cfg.optim, model)
    assert isinstance(opt, AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    params = model.online_parameters()
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decoupled decay moves a weight
    opt.set_lr(0.01)
    opt.step()
    for p, b, skip in zip(params, before, excluded_parameters(model)):
        torch.testing.assert_close(p.detach(), b if skip else b * (1 - 0.01 * 0.1), atol=0, rtol=1e-6)


def test_flops_count_the_attention():
    enc = _meta("vit_small_patch16")
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        enc(torch.empty(1, 3, 224, 224, device="meta"))
    d, n, depth = 384, 197, 12
    linear = 2 * n * (3 * d * d + d * d + 8 * d * d) * depth + 2 * 196 * (3 * 16 * 16) * d  # qkv, proj, mlp, patches
    attention = 2 * 2 * n * n * d * depth  # q k^T and att v
    assert counter.get_total_flops() == linear + attention
    model = BYOL(enc, 64, 32, 64)
    # 2 views: online fwd + bwd (3x) and target fwd = 8 encoder forwards, less the patch projection's input gradient
    # (the images need none: 2 views x its forward), plus the small heads
    expected = 8 * (linear + attention) - 2 * 2 * 196 * (3 * 16 * 16) * d
    per_image = flops_per_image(model, 224)
    assert expected <= per_image < 1.001 * expected


def test_bf16_autocast_forward_on_cpu():
    model = BYOL(build_encoder("vit-tiny-cpu", image_size=16), 64, 32, 64)
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    ref = model(v1, v2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(v1, v2)
    assert out[0].dtype == torch.bfloat16
    for a, b in zip(out, ref):
        torch.testing.assert_close(F.normalize(a.float(), dim=1), F.normalize(b, dim=1), atol=0.1, rtol=0.1)


@pytest.mark.slow
def test_tiny_vit_compiles_fullgraph_on_cpu():
    enc = VisionTransformer(image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    model = BYOL(enc, 16, 8, 16)
    v1, v2 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    got, ref = compiled(v1, v2), model(v1, v2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    sum(t.sum() for t in got[:2]).backward()
    assert all(p.grad is not None for p in model.online_parameters())


@pytest.mark.slow
def test_vit_resumes_exactly_after_a_kill(tmp_path):
    summary = kill_and_resume(tmp_path, ["--arch", "vit-tiny-cpu", "--optimizer", "adamw", "--base-lr", "1e-3",
                                         "--weight-decay", "0.05"])
    assert summary["knn_top1"] is not None  # the kNN monitor read the 28 px data with the 16 px model


def test_vit_presets_name_their_recipe():
    from fastbyol.config import PRESETS

    vit_s = PRESETS["imagenet-vit-small"][0]
    assert (vit_s.model.arch, vit_s.optim.optimizer, vit_s.optim.base_lr, vit_s.optim.weight_decay,
            vit_s.optim.warmup_epochs) == ("vit_small_patch16", "adamw", 1.5e-4, 0.1, 40)
    assert "MoCo v3" in PRESETS["imagenet-vit-small"][1]
    tiny = PRESETS["fmnist-vit-tiny"][0]
    assert ARCHS[tiny.model.arch].family == "vit" and tiny.data.image_size == 28
    for cfg in (vit_s, tiny):
        cfg.validate()
