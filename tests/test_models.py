"""Encoders match torchvision's names and shapes; the BYOL module is wired as the paper says."""

import pytest
import torch

from fastbyol.models import BYOL, build_encoder, mlp, params_sha256

# torchvision's parameter counts without the 1000-way fc (resnet18: 11,689,512 - 513,000, ...)
TORCHVISION_TRUNK_PARAMS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


def torchvision_resnet_keys(layers, bottleneck):
    """state_dict keys and shapes of torchvision.models.resnet*, minus fc, written from torchvision's layout."""
    bn = lambda name, c: {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),  # noqa: E731
                          f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}
    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    cin, exp = 64, 4 if bottleneck else 1
    for i, (n, w) in enumerate(zip(layers, (64, 128, 256, 512))):
        for j in range(n):
            pre = f"layer{i + 1}.{j}"
            if bottleneck:
                keys.update({f"{pre}.conv1.weight": (w, cin, 1, 1), **bn(f"{pre}.bn1", w),
                             f"{pre}.conv2.weight": (w, w, 3, 3), **bn(f"{pre}.bn2", w),
                             f"{pre}.conv3.weight": (w * 4, w, 1, 1), **bn(f"{pre}.bn3", w * 4)})
            else:
                keys.update({f"{pre}.conv1.weight": (w, cin, 3, 3), **bn(f"{pre}.bn1", w),
                             f"{pre}.conv2.weight": (w, w, 3, 3), **bn(f"{pre}.bn2", w)})
            if j == 0 and (i > 0 or cin != w * exp):
                keys.update({f"{pre}.downsample.0.weight": (w * exp, cin, 1, 1), **bn(f"{pre}.downsample.1", w * exp)})
            cin = w * exp
    return keys


@pytest.mark.parametrize("arch,layers,bottleneck", [("resnet18", (2, 2, 2, 2), False),
                                                     ("resnet34", (3, 4, 6, 3), False),
                                                     ("resnet50", (3, 4, 6, 3), True)])
def test_resnet_matches_torchvision_layout(arch, layers, bottleneck):
    enc = build_encoder(arch, stem="imagenet")
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == torchvision_resnet_keys(layers, bottleneck)
    assert sum(p.numel() for p in enc.parameters()) == TORCHVISION_TRUNK_PARAMS[arch]
    assert enc.feature_dim == (2048 if bottleneck else 512)


def test_against_torchvision_when_installed():
    tv = pytest.importorskip("torchvision")
    for arch in ("resnet18", "resnet50"):
        ref = {k: tuple(v.shape) for k, v in getattr(tv.models, arch)().state_dict().items() if not k.startswith("fc.")}
        got = {k: tuple(v.shape) for k, v in build_encoder(arch, stem="imagenet").state_dict().items()}
        assert got == ref


def test_small_stem_for_small_images():
    enc = build_encoder("resnet18", stem="auto", image_size=32)
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, torch.nn.Identity)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    big = build_encoder("resnet18", stem="auto", image_size=96)
    assert big.conv1.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="unknown arch"):
        build_encoder("vgg16")


def test_heads_shapes():
    proj = mlp(2048, 4096, 256)
    assert [tuple(m.weight.shape) for m in proj if hasattr(m, "weight")] == [(4096, 2048), (4096,), (256, 4096)]
    model = BYOL(build_encoder("resnet50", image_size=224))
    assert model.predictor[0].weight.shape == (4096, 256) and model.predictor[3].weight.shape == (256, 4096)


def test_byol_target_is_a_no_grad_copy_with_its_own_bn_stats():
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=28), 64, 32, 64)
    target, online = model.ema_pairs()
    assert len(target) == len(online) and all(not t.requires_grad for t in target)
    assert all(t.data_ptr() != o.data_ptr() for t, o in zip(target, online))
    assert all(torch.equal(t, o) for t, o in zip(target, online))  # starts as a copy
    v1, v2 = torch.randn(8, 3, 28, 28), torch.randn(8, 3, 28, 28) * 3 + 1
    p1, p2, z1, z2, h1 = model(v1, v2)
    assert p1.shape == z1.shape == (8, 32) and h1.shape == (8, model.feature_dim) and not h1.requires_grad
    assert p1.requires_grad and not z1.requires_grad
    # both networks ran in train mode and updated their own running statistics
    rm_online = model.online_encoder.bn1.running_mean
    rm_target = model.target_encoder.bn1.running_mean
    assert rm_online.abs().sum() > 0 and rm_target.abs().sum() > 0
    assert rm_online.data_ptr() != rm_target.data_ptr()
    # BN statistics per view (both views in one pass), so view 1's output does not depend on view 2
    p1_again, _, z1_again, _, _ = BYOL.forward(model, v1, torch.randn(8, 3, 28, 28))
    torch.testing.assert_close(p1_again, p1)
    torch.testing.assert_close(z1_again, z1)


def test_params_sha256_sees_every_parameter():
    model = BYOL(build_encoder("resnet-tiny", stem="small-s2", image_size=28), 64, 32, 64)
    h = params_sha256(model)
    assert h == params_sha256(model)
    with torch.no_grad():
        model.target_projector[3].bias[0] += 1e-3
    assert params_sha256(model) != h


def test_the_registry_is_what_the_command_line_offers():
    from fastbyol.cli import _build_parser
    from fastbyol.models import ARCHS

    parser = _build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    arch = next(a for a in train._actions if "--arch" in a.option_strings)
    assert all(name in arch.help for name in ARCHS) and "module.path:factory" in arch.help
