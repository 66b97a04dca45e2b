"""The errors a user sees as one line: the CLI prints these and exits with status 2 (no traceback without --debug);
a run stopped by a signal exits with 75 (`Preempted`, fastbyol.run.preemption.EXIT_PREEMPTED)."""


class FastByolError(Exception):
    """A problem with the user's input or settings (missing data, bad option); the message names it."""


class TrainingStopped(FastByolError):
    """The run stopped on purpose (non-finite loss or weights, a failed final evaluation): its directory and last
    good checkpoint stay."""


class Preempted(TrainingStopped):
    """The run stopped on a signal at a log point, its checkpoint written: the CLI exits with EXIT_PREEMPTED."""
