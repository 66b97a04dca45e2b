"""The scalars of a metrics record, by the tags every dashboard shows them under: TensorBoard (RunFiles) and Weights &
Biases (wandb_sink.py) read this one mapping, so both show the same numbers under the same names.

    train/loss, train/lr, train/tau, train/img_per_s, train/mfu, train/data_wait_share   every log point
    knn/top1_subset, probe/top1_subset                                                   every --knn-every epochs
    knn/top1, knn/top1_random_init, probe/top1                                           at the end
"""

from __future__ import annotations

NOT_SCALARS = ("step", "epoch", "knn_subset")  # the record's coordinates, not figures


def scalar_tags(record: dict) -> dict[str, float]:
    """tag -> value of every number of a metrics.jsonl record (booleans, None and the coordinates left out)."""
    tags = {}
    for name, value in record.items():
        if name in NOT_SCALARS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name == "knn_top1":
            tag = ("knn/top1_random_init" if record.get("init") == "random" else
                   "knn/top1_subset" if "knn_subset" in record else "knn/top1")
        elif name == "online_probe_top1":
            tag = "probe/top1" if record.get("final") else "probe/top1_subset"
        else:
            tag = f"train/{name}"
        tags[tag] = value
    return tags
