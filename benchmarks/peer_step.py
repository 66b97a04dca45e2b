"""The BYOL training step of the two peers people use, run as their README / example runs it, beside ours
(`fastbyol.tools.bench_step.bench_step`): same card, same torchvision ResNet-50, same batch, two views per image.

    python benchmarks/peer_step.py                      # every peer, ResNet-50, 224 px, batch 256 (CUDA)
    python benchmarks/peer_step.py --tiny               # every peer, ResNet-18, 32 px, batch 8 (CPU smoke run)
    python benchmarks/peer_step.py --peer lightly --steps 20 --json

Rows (`PEERS`; each row's `runs` field says the same):
- byol-pytorch (lucidrains): `BYOL(resnet50(), image_size, hidden_layer="avgpool")`, `Adam(lr=3e-4)`, and per step
  `loss = learner(images); opt.zero_grad(); loss.backward(); opt.step(); learner.update_moving_average()`, as its
  README. Its own augmentation is replaced by the two device-resident views (`augment_fn` / `augment_fn2` return
  them), so the row is the step alone, as ours is; everything else is its default (0.9.x: simplicial embeddings on,
  projector and predictor 4096 -> 256, EMA 0.99 by a per-parameter loop).
- byol-pytorch-own-augment: the same, with its default augmentation (torchvision transforms on the batch tensor:
  one random draw per batch) inside the step, as its README runs it.
- lightly: lightly's BYOL example (examples/pytorch/byol.py) at ResNet-50 widths: the torchvision ResNet-50 without
  its fc as backbone, `BYOLProjectionHead(2048, 4096, 256)`, `BYOLPredictionHead(256, 4096, 256)`, momentum copies,
  `NegativeCosineSimilarity`, `SGD(lr=0.06)`, `update_momentum` of backbone and projector every step, four forwards
  (online and momentum on each view), `loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))`.
On CUDA the forward and the loss run under `torch.autocast(bfloat16)` (neither README does it; both allow it), the
inputs are fp32 NCHW batches as their data loaders give, cuDNN's default settings (no autotuning): what a user of
the peer runs. FLOPs per image are counted by torch (FlopCounterMode over one forward + backward on 2 images), so
MFU comes from each row's own network through `fastbyol.run.perf.mfu`. A peer that is not importable gives a row with
`error: "not installed: ..."`; the GPU plan carries their wheels (benchmarks/gpu_plan.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

PEERS = ("byol-pytorch", "byol-pytorch-own-augment", "lightly")
# what each row imports (the GPU machine has torchvision; the peers travel as wheels)
_MODULES = {"byol-pytorch": ("byol_pytorch", "torchvision"),
            "byol-pytorch-own-augment": ("byol_pytorch", "torchvision"),
            "lightly": ("lightly", "torchvision")}


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version({"byol_pytorch": "byol-pytorch"}.get(module, module))
    except Exception:  # noqa: BLE001 (metadata missing: the import still worked)
        return None


def _resnet(arch: str):
    import torchvision

    return getattr(torchvision.models, arch)()  # random init: weights=None by default


def _byol_pytorch(arch: str, size: int, views: dict, own_augment: bool):
    """(step, forward_backward) of byol-pytorch's README loop; views['v1'], views['v2'] are the current views."""
    from byol_pytorch import BYOL

    kwargs = {} if own_augment else {"augment_fn": lambda x: views["v1"], "augment_fn2": lambda x: views["v2"]}
    learner = BYOL(_resnet(arch).to(views["v1"].device), image_size=size, hidden_layer="avgpool", **kwargs)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    autocast = views["v1"].device.type == "cuda"

    def forward_backward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = learner(views["images"])
        loss.backward()
        return loss

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = learner(views["images"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
        return loss

    return step, forward_backward


def _lightly(arch: str, size: int, views: dict):
    """(step, forward_backward) of lightly's BYOL example loop."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch import nn

    resnet = _resnet(arch)
    width = resnet.fc.in_features  # 2048 for ResNet-50

    class LightlyBYOL(nn.Module):  # the example's module, at ResNet-50 widths
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(width, 4096, 256)
            self.prediction_head = BYOLPredictionHead(256, 4096, 256)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    device = views["v1"].device
    model = LightlyBYOL(nn.Sequential(*list(resnet.children())[:-1])).to(device)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    momentum_val = cosine_schedule(0, 10, 0.996, 1)
    autocast = device.type == "cuda"

    def loss_of(x0, x1):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

    def forward_backward():
        loss = loss_of(views["v1"], views["v2"])
        loss.backward()
        return loss

    def step():
        update_momentum(model.backbone, model.backbone_momentum, m=momentum_val)
        update_momentum(model.projection_head, model.projection_head_momentum, m=momentum_val)
        loss = loss_of(views["v1"], views["v2"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step, forward_backward


RUNS = {
    "byol-pytorch": "byol_pytorch.BYOL(torchvision {arch}, hidden_layer='avgpool'), Adam 3e-4, README loop with "
                    "update_moving_average(); augment_fn/augment_fn2 return the device-resident views",
    "byol-pytorch-own-augment": "byol_pytorch.BYOL(torchvision {arch}, hidden_layer='avgpool'), Adam 3e-4, README "
                                "loop; its default batch augmentation runs inside the step",
    "lightly": "lightly examples/pytorch/byol.py at {arch} widths: BYOLProjectionHead({width}, 4096, 256), "
               "BYOLPredictionHead(256, 4096, 256), NegativeCosineSimilarity, SGD 0.06, update_momentum per step",
}


def peer_step(peer: str, arch: str = "resnet50", size: int = 224, batch: int = 256, steps: int = 10, warmup: int = 3,
              device: str | None = None) -> dict:
    """img/s, step ms, FLOPs per image, MFU and peak memory of one peer's training step (see the module docstring).
    A peer that cannot be imported gives {'error': 'not installed: ...'} with the row's identity."""
    from fastbyol.run.perf import mfu, peak_flops

    if peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS}, got {peer!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    row = {"arch": arch, "size": size, "batch": batch, "variant": peer, "compile": "off",
           "source": "own augmentation" if peer.endswith("own-augment") else "synthetic", "device": str(dev)}
    missing = []
    for module in _MODULES[peer]:
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        return {**row, "error": "not installed: " + ", ".join(missing)}
    row["versions"] = {m: _version(m) for m in _MODULES[peer]}
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # the peers' users run with cuDNN's default
    try:
        return {**row, **_measure(peer, arch, size, batch, steps, warmup, dev, mfu, peak_flops)}
    finally:
        torch.backends.cudnn.benchmark = previous


def _measure(peer, arch, size, batch, steps, warmup, dev, mfu, peak_flops) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    gen = torch.Generator(device=dev).manual_seed(0)
    # fp32 NCHW views as the peers' data loaders give them; images in [0, 1) for the own-augmentation row
    views = {"v1": torch.randn(batch, 3, size, size, device=dev, generator=gen),
             "v2": torch.randn(batch, 3, size, size, device=dev, generator=gen),
             "images": torch.rand(batch, 3, size, size, device=dev, generator=gen)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if peer == "lightly":
        step, forward_backward = _lightly(arch, size, views)
    else:
        step, forward_backward = _byol_pytorch(arch, size, views, own_augment=peer.endswith("own-augment"))
    # FLOPs of one image: a forward + backward on 2 images, as fastbyol.run.perf.flops_per_image counts ours
    full = dict(views)
    views.update({k: v[:2] for k, v in full.items()})
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    flops = counter.get_total_flops() / 2
    views.update(full)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    loss.item()  # sync
    warmup_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # sync: the last step is done
    seconds = time.perf_counter() - t0
    img_s = steps * batch / seconds
    width = 2048 if arch == "resnet50" else 512
    return {"img_per_s": img_s, "step_ms": 1000 * seconds / steps, "flops_per_image": flops,
            "mfu": mfu(img_s, flops, peak_flops(dev)), "warmup_seconds": warmup_seconds, "steps": steps,
            "bf16_autocast": dev.type == "cuda", "cudnn_benchmark": False, "final_loss": float(loss.detach()),
            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
            "runs": RUNS[peer].format(arch=arch, width=width)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", choices=PEERS, action="append", help="a peer (repeatable; default: all)")
    ap.add_argument("--arch", default=None, help="torchvision ResNet (default resnet50; --tiny: resnet18)")
    ap.add_argument("--size", type=int, default=None, help="view side, px (default 224; --tiny: 32)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 256; --tiny: 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke run)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    args = ap.parse_args(argv)
    arch = args.arch or ("resnet18" if args.tiny else "resnet50")
    size = args.size or (32 if args.tiny else 224)
    batch = args.batch or (8 if args.tiny else 256)
    for peer in args.peer or PEERS:
        try:
            row = peer_step(peer, arch, size, batch, steps=args.steps, warmup=1 if args.tiny else 3)
        except Exception as e:  # noqa: BLE001 (one failed peer must not lose the others)
            row = {"variant": peer, "arch": arch, "size": size, "batch": batch,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{peer}: {row['error']}", flush=True)
        else:
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
            print(f"{peer}: {row['img_per_s']:.0f} img/s, {row['step_ms']:.1f} ms/step, "
                  f"{row['flops_per_image'] / 1e9:.2f} GFLOP/img, MFU {mfu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
