"""lightly's BYOL (its example, examples/pytorch/byol.py) trained on fastbyol's default workload; run with the peers'
venv, never the project's:

    PEER_VENV/bin/python benchmarks/peers/lightly_byol.py --seed 0 [--out result.json] [--blur-off]

What is lightly's, as its example writes it: BYOLTransform (BYOLView1Transform + BYOLView2Transform: torchvision
and PIL, per image, in DataLoader workers), BYOLProjectionHead / BYOLPredictionHead, the momentum copies with
deactivate_requires_grad, NegativeCosineSimilarity with loss = 0.5 (criterion(p0, z1) + criterion(p1, z0)),
update_momentum of backbone and projection head with m = cosine_schedule(step, max_steps, tau_base, 1) before the
forwards, then backward and optimizer step.
What is the workload's, so the comparison is on the same work (benchmarks/peers/workload.py): the data (the
embedded split, every 5th image held out; crops of area 0.2-1 via min_scale), fastbyol's resnet-tiny encoder
(small-s2 stem) as the backbone, the heads at fastbyol's widths (128 -> 1024 -> 256, 256 -> 1024 -> 256), batch 128
(drop_last), 16 epochs, and in place of the example's SGD(0.06) the budget's optimizer: lightly's own LARS
(lightly.utils.lars, trust coefficient 1e-3, momentum 0.9) with weight decay 1e-6 on the weights and none on biases
and norms (lightly.models.utils.get_weight_decay_parameters: lightly's LARS then leaves those unadapted, as fastbyol
does), lr = 4 x 128 / 256 = 2.0, warmup 1 epoch then cosine to 0 (fastbyol's lr_at, set every step); the momentum
schedule tau 0.99 -> 1 per step. kNN: fastbyol's evaluator (k 200, T 0.1), copied in workload.py.
Prints one JSON line: knn_top1, knn_top1_random_init, img_per_s (fastbyol's clock), train/wall seconds, versions.
"""

from __future__ import annotations

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import workload as W  # noqa: E402


class ArrayImages(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 -> (PIL RGB image through `transform`, 0): what a torchvision dataset hands lightly."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), 0


class BYOL(nn.Module):
    """lightly's example module, with the workload's backbone and widths."""

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int, proj_dim: int, pred_hidden: int):
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, proj_hidden, proj_dim)
        self.prediction_head = BYOLPredictionHead(proj_dim, pred_hidden, proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()


def main(argv: list[str] | None = None) -> dict:
    ap = W.peer_args(__doc__.splitlines()[0],
                     (("--workers",), dict(type=int, default=2, help="DataLoader worker processes (one per core here)")),
                     (("--blur-off",), dict(action="store_true", help="gaussian_blur=0 in both views (an ablation)")))
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import get_weight_decay_parameters, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.lars import LARS
    from lightly.utils.scheduler import cosine_schedule

    w = W.WORKLOAD
    train_x, train_y, test_x, test_y = W.load_split()
    pretrain = train_x[:args.limit_images] if args.limit_images else train_x
    size, blur = w["image_size"], {"gaussian_blur": 0.0} if args.blur_off else {}
    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=size, min_scale=w["crop_min_area"], **blur),
        view_2_transform=BYOLView2Transform(input_size=size, min_scale=w["crop_min_area"], **blur))

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    backbone = W.build_encoder()  # drawn first after the seed, as fastbyol draws its encoder
    model = BYOL(backbone, backbone.feature_dim, w["proj_hidden"], w["proj_dim"], w["pred_hidden"])
    loader = torch.utils.data.DataLoader(ArrayImages(pretrain, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    criterion = NegativeCosineSimilarity()
    decay, no_decay = get_weight_decay_parameters([model.backbone, model.projection_head, model.prediction_head])
    optimizer = LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.0,
                     momentum=w["momentum"], weight_decay=w["weight_decay"],
                     trust_coefficient=w["trust_coefficient"])

    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(w["warmup_epochs"] * steps_per_epoch))
    peak_lr = w["base_lr"] * args.batch_size / 256.0
    clock, step, loss_sum = W.StepClock(args.batch_size), 0, 0.0
    for _epoch in range(args.epochs):
        clock.resume()
        for (x0, x1), _ in loader:
            m = cosine_schedule(step, total_steps, w["tau_base"], 1.0)
            update_momentum(model.backbone, model.backbone_momentum, m=m)
            update_momentum(model.projection_head, model.projection_head_momentum, m=m)
            for group in optimizer.param_groups:
                group["lr"] = W.lr_at(step, total_steps, warmup_steps, peak_lr)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            clock.step()
            if step % 50 == 0 or step == total_steps:
                loss_sum = loss.item()  # sync: a loss read for the log, as the example's total_loss
                print(f"step {step}/{total_steps} loss {loss_sum:.4f}", file=sys.stderr, flush=True)
        clock.pause()

    if args.save_encoder:
        torch.save(model.backbone.state_dict(), args.save_encoder)
    k, temp = w["knn_k"], w["knn_temperature"]
    knn = W.knn_top1(model.backbone, train_x, train_y, test_x, test_y, 10, k, temp)
    knn_random = W.knn_top1(W.build_encoder(args.seed), train_x, train_y, test_x, test_y, 10, k, temp)
    result = {"system": "lightly" + ("-blur-off" if args.blur_off else ""), "seed": args.seed,
              "knn_top1": knn, "knn_top1_random_init": knn_random, **clock.summary(), "steps": step,
              "final_loss": loss_sum, "wall_seconds": time.perf_counter() - wall0, "workers": args.workers,
              "torch_threads": torch.get_num_threads(), "versions": W.versions("lightly", "torchvision", "pillow")}
    W.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
