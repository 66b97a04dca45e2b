"""The run directory's file names, spelled once. Plain strings, no imports: the CLI reads them before torch loads.

    RUN/config.json      the settings and the resolved values (written at the start; the resume reads it)
    RUN/metrics.jsonl    one JSON record per log point, kNN check and final figure
    RUN/checkpoint.pt    the last checkpoint (weights_only-loadable plain data)
    RUN/summary.json     the final figures, written before the checkpoint that marks the run finished
    RUN/bad_files.json   files replaced while training (--skip-bad-files)
    RUN/tensorboard/     TensorBoard events (when tensorboard is installed)
    RUN/profile/         --profile traces
    RUN/wandb/           Weights & Biases files (--wandb)
    RUN/.lock            the writer's OS lock (flock), held while a command writes the folder
"""

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
BAD_FILES = "bad_files.json"
TENSORBOARD = "tensorboard"
PROFILE = "profile"
WANDB = "wandb"
LOCK = ".lock"
CURVES = "curves.png"

# the files that make a folder a run: nothing may write over them but the run itself
RUN_FILES = frozenset({CONFIG, METRICS, CHECKPOINT, SUMMARY, BAD_FILES, LOCK})
# what a new run writes before its first checkpoint: removable when it is restarted (--auto-resume)
BEFORE_FIRST_CHECKPOINT = frozenset({CONFIG, METRICS, TENSORBOARD, PROFILE, WANDB, BAD_FILES, LOCK})
