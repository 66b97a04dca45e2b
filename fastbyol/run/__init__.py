"""The run directory and what the trainer keeps in it: its files and lock (`files`, `checkpoint`, `disk`; who else
may write where: `outputs`), the training state a checkpoint carries (`state`), stop signals and `--auto-resume`
(`preemption`), and the measurements a run makes of itself (`meter`, `perf`, `profiling`)."""
