"""Weights & Biases for a run (`--wandb PROJECT`; `pip install 'fastbyol[wandb]'`): the scalars TensorBoard gets, under
the same tags (scalars.py), the run's settings as the W&B config, its files under RUN/wandb/.

    fastbyol train --wandb my-project ...                      # online: needs `wandb login` (or WANDB_API_KEY)
    WANDB_MODE=offline fastbyol train --wandb my-project ...   # no network: `wandb sync RUN/wandb/offline-run-*` later

A resumed run logs to the same W&B run (its id is kept in RUN/wandb/run-id); W&B takes steps in increasing order
only, so the steps between the checkpoint and the stop, logged once already, are dropped there (metrics.jsonl has
them once, as the run wrote them again).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from ..errors import FastByolError
from .names import WANDB
from .scalars import scalar_tags

ID_FILE = "run-id"


class WandbSink:
    """A run's W&B logger, a sink of the run's reporting: `write(record)` per metrics record, `close()` at the end
    (rank 0 only)."""

    def __init__(self, project: str, run_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise FastByolError(f"--wandb {project}: needs the wandb package: pip install 'fastbyol[wandb]'") from None
        folder = Path(run_dir) / WANDB
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, id=run_id,
                              resume="allow")
        self.last_step = -1

    def write(self, record: dict) -> None:
        """Log points and kNN checks at their step; the final figures (the trained and the random-init encoder's)
        into the run's summary, where W&B shows a run's results (the random-init one is at step 0)."""
        tags, step = scalar_tags(record), int(record["step"])
        if record.get("final"):
            self.run.summary.update(tags)
            return
        if not tags or step < self.last_step:  # W&B refuses steps that go back (a resume's repeated steps)
            return
        self.run.log(tags, step=step)
        self.last_step = step

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
