"""The training state: everything besides the weights that a run needs to continue exactly, in one dataclass, and the
one place where a checkpoint is written from it and read back.

A checkpoint is a dict of plain types and tensors only, so it loads with `torch.load(weights_only=True)`: a run
directory on a shared filesystem is data, not code. Its `format` number says which layout it has; any other number,
or none, is refused in one line, as any foreign file is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

import torch

from ..errors import FastByolError

CHECKPOINT_FORMAT = 2
# bounds of the counts a checkpoint holds (a checkpoint is a file: its numbers are bounded before anything uses them)
MAX_STEPS, MAX_WORLD_SIZE, MAX_IMAGES = 1 << 48, 1 << 20, 1 << 40


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (global: every process takes each one)
    world_size: int = 1  # processes the run was checkpointed with; resume needs as many
    num_images: int = 0  # pretraining images of the dataset: a resume over a changed dataset is refused
    knn_top1_random_init: float | None = None  # the random-init encoder's kNN top-1 (%), once measured
    data_states: list = field(default_factory=list)  # every rank's loader state (DALI checkpoint), rank order
    torch_rngs: list = field(default_factory=list)  # every rank's torch CPU RNG state (uint8 tensors), rank order
    meter: dict = field(default_factory=dict)  # ThroughputMeter.state_dict() of the timed steps so far
    peak_device_bytes: float = 0.0  # GPU memory in use by every allocator (torch, DALI), highest seen at a log point
    finished: bool = False  # the final checkpoint: nothing left to resume
    probe: dict = field(default_factory=dict)  # OnlineProbe.state_dict() ({} where there is no probe)
    run_id: str = ""  # the run's id, as its config.json holds it (checkpoint.new_run_id); "" for runs made before ids

    def to_checkpoint(self, model_state: dict, optimizer_state: dict, config: dict, version: str) -> dict:
        """The checkpoint dict: weights, optimizer, this state, the config it ran with."""
        return {"format": CHECKPOINT_FORMAT, "model": model_state, "optimizer": optimizer_state, "state": asdict(self),
                "config": config, "fastbyol_version": version}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, where: str = "checkpoint") -> TrainState:
        """The state of a checkpoint dict, or a FastByolError naming it."""
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise FastByolError(f"{where}: not a fastbyol checkpoint")
        fmt = ckpt.get("format")
        if isinstance(fmt, bool) or not isinstance(fmt, int):  # a tensor here once raised from `==`
            raise FastByolError(f"{where}: it has no checkpoint format number (not a checkpoint this fastbyol wrote)")
        if fmt != CHECKPOINT_FORMAT:
            raise FastByolError(f"{where}: checkpoint format {short_repr(fmt)} is not one this fastbyol reads "
                                f"(it reads {CHECKPOINT_FORMAT})")
        raw = ckpt.get("state")
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise FastByolError(f"{where}: its training state is unreadable")
        return cls(**raw).checked(where)

    def check_resumable(self, where, world_size: int, num_images: int, total_steps: int) -> None:
        """Refuse, in one line naming the run `where`, a resume this state cannot continue exactly: a step past the
        schedule, another number of processes, a dataset of another size."""
        if self.step > total_steps:
            raise FastByolError(f"{where}: its checkpoint is at step {self.step}, past the run's {total_steps} steps "
                                "(a damaged checkpoint or a changed config.json)")
        if self.world_size != world_size:
            raise FastByolError(f"{where}: the run was checkpointed with {self.world_size} processes; resume it with "
                                f"as many (got {world_size})")
        if self.num_images and self.num_images != num_images:
            raise FastByolError(f"{where}: the run trained on {self.num_images} images, the dataset now has "
                                f"{num_images}; its schedule would change: resume over the same data, or start a "
                                "new run")

    def checked(self, where: str = "checkpoint") -> TrainState:
        """This state, if every field has its type and range (a checkpoint is untrusted input: nothing is restored
        from it before this passes), else a FastByolError naming the field."""
        def bad(name: str, why: str):
            raise FastByolError(f"{where}: its training state is damaged ({name} {why})")

        def count(name: str, value, low: int, high: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                bad(name, f"is {short_repr(value)}, not an integer in {low}..{high}")

        count("step", self.step, 0, MAX_STEPS)
        count("world_size", self.world_size, 1, MAX_WORLD_SIZE)
        count("num_images", self.num_images, 0, MAX_IMAGES)
        if self.knn_top1_random_init is not None and not (isinstance(self.knn_top1_random_init, (int, float))
                                                          and 0.0 <= self.knn_top1_random_init <= 100.0):
            bad("knn_top1_random_init", f"is {short_repr(self.knn_top1_random_init)}, not a percentage")
        if not isinstance(self.data_states, list) or not all(isinstance(d, (str, bytes)) for d in self.data_states):
            bad("data_states", "is not a list of loader checkpoints (strings)")
        rng_size = torch.get_rng_state().numel()
        if not isinstance(self.torch_rngs, list) or not all(
                isinstance(r, torch.Tensor) and r.dtype == torch.uint8 and r.dim() == 1 and r.numel() == rng_size
                for r in self.torch_rngs):
            bad("torch_rngs", f"is not a list of torch RNG states ({rng_size} bytes each)")
        for name, states in (("data_states", self.data_states), ("torch_rngs", self.torch_rngs)):
            if states and len(states) != self.world_size:
                bad(name, f"has {len(states)} entries for {self.world_size} processes")
        meter_keys = {"steps", "seconds", "wait_seconds", "warmup_seconds"}  # ThroughputMeter.state_dict()
        if not isinstance(self.meter, dict) or (self.meter and set(self.meter) != meter_keys) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in self.meter.values()):
            bad("meter", f"is not the throughput meter's state ({', '.join(sorted(meter_keys))}: numbers >= 0)")
        if not isinstance(self.peak_device_bytes, (int, float)) or self.peak_device_bytes < 0:
            bad("peak_device_bytes", f"is {short_repr(self.peak_device_bytes)}")
        if not isinstance(self.finished, bool):
            bad("finished", f"is {short_repr(self.finished)}, not true or false")
        if not isinstance(self.probe, dict):
            bad("probe", f"is {short_repr(self.probe)}, not the online probe's state")
        if not isinstance(self.run_id, str) or self.run_id and not re.fullmatch(r"[0-9a-f]{32}", self.run_id):
            bad("run_id", f"is {short_repr(self.run_id)}, not a run id (32 hex digits)")
        return self


def short_repr(value, limit: int = 60) -> str:
    """A value as it appears in a one-line message: its repr on one line, cut at `limit` characters (a tensor's
    repr spans lines; a damaged field may be any size)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def nonfinite_tensors(state: dict, prefix: str = "") -> list[str]:
    """Names of the floating tensors in a (nested) state dict that hold a NaN or an Inf."""
    bad = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            bad += nonfinite_tensors(value, f"{name}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad.append(name)
    return bad
