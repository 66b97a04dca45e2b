"""byol-pytorch (lucidrains) trained as its README shows, on fastbyol's default workload; run with the peers' venv:

    PEER_VENV/bin/python benchmarks/peers/byol_pytorch_readme.py --seed 0 [--out result.json]

As its README: `learner = BYOL(net, image_size, hidden_layer="avgpool")`, `Adam(learner.parameters(), lr=3e-4)`, and
per step `loss = learner(images); opt.zero_grad(); loss.backward(); opt.step(); learner.update_moving_average()`,
with its own defaults for everything else (its batch-level torchvision augmentation inside the forward, EMA 0.99
without a schedule, simplicial embeddings on, its loss). From the workload (benchmarks/peers/workload.py): the data
(the embedded split; batches of 128 [0, 1] float images, reshuffled every epoch by a seeded numpy permutation, last
partial batch dropped), fastbyol's resnet-tiny encoder as `net` (its `avgpool` is the hooked layer, 128 features),
image_size 28, 16 epochs, and the heads' hidden width 1024 (`projection_hidden_size`, the README's documented
argument; 4096 by default) so the heads are the workload's. kNN: fastbyol's evaluator on `net`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import workload as W  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = W.peer_args(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    wall0 = time.perf_counter()

    from byol_pytorch import BYOL

    w = W.WORKLOAD
    train_x, train_y, test_x, test_y = W.load_split()
    pretrain = train_x[:args.limit_images] if args.limit_images else train_x
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = W.build_encoder()  # drawn first after the seed, as fastbyol draws its encoder
    learner = BYOL(net, image_size=w["image_size"], hidden_layer="avgpool", projection_size=w["proj_dim"],
                   projection_hidden_size=w["proj_hidden"])
    opt = torch.optim.Adam(learner.parameters(), lr=3e-4)
    # (N, 3, 28, 28) float in [0, 1], what the README's sample_unlabelled_images() gives
    images = torch.from_numpy(pretrain).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    steps_per_epoch = len(images) // args.batch_size
    clock, step, last = W.StepClock(args.batch_size), 0, 0.0
    for _epoch in range(args.epochs):
        clock.resume()
        order = torch.from_numpy(rng.permutation(len(images)))
        for i in range(steps_per_epoch):
            batch = images.index_select(0, order[i * args.batch_size:(i + 1) * args.batch_size])
            loss = learner(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            learner.update_moving_average()
            step += 1
            clock.step()
            if step % 50 == 0 or step == args.epochs * steps_per_epoch:
                last = loss.item()  # sync: a loss read for the log
                print(f"step {step} loss {last:.4f}", file=sys.stderr, flush=True)
        clock.pause()

    if args.save_encoder:
        torch.save(net.state_dict(), args.save_encoder)
    k, temp = w["knn_k"], w["knn_temperature"]
    knn = W.knn_top1(net, train_x, train_y, test_x, test_y, 10, k, temp)
    knn_random = W.knn_top1(W.build_encoder(args.seed), train_x, train_y, test_x, test_y, 10, k, temp)
    result = {"system": "byol-pytorch", "seed": args.seed, "knn_top1": knn, "knn_top1_random_init": knn_random,
              **clock.summary(), "steps": step, "final_loss": last, "wall_seconds": time.perf_counter() - wall0,
              "torch_threads": torch.get_num_threads(), "versions": W.versions("byol-pytorch", "torchvision")}
    W.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
