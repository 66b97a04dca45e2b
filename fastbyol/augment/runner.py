"""Running the two views' DALI graph batch after batch, for TwoViewLoader (fastbyol.augment.loader).

- `Pipeline`: what the runner needs of a built pipeline. `DaliPipeline` is DALI's; TwoViewLoader takes any factory of
  them (`make_pipeline=`), so a test can wrap the real one or fake it without reaching into the loader.
- `GraphRunner`: one pipeline, run batch after batch and rebuilt at a checkpoint where it must be (a pipeline that
  raised is no longer usable); what native code prints while it runs is folded into fastbyol's messages, never
  printed (DALI decodes ahead between two runs, so the capture stays open from the first run to close()).
- `DecodeFailures`: an encoded file that passed the header checks but does not decode is named in one line, or, when
  the source skips bad files, replaced by another good file and the batch run again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch

from ..data.dataset import EncodedSource
from ..data.decode import batch_failure
from ..errors import FastByolError
from ..system.native import Captured, NativeWindow, fold, native_stderr
from .pipelines import DaliGraph, build_pipeline, decoder_ops, operator_count

Checkpoint = bytes | str  # DALI's checkpoint of a pipeline: every random state and the read position


@runtime_checkable
class Pipeline(Protocol):
    """A built pipeline of a DaliGraph, as GraphRunner uses it."""

    operators: int  # operators in the graph; -1 where unknown
    decoders: int  # image decoders in the graph; -1 where unknown

    def run(self, stream: torch.cuda.Stream | None = None) -> tuple:
        """One batch of the graph's outputs (bound to `stream` on CUDA). Raises StopIteration where an array epoch
        ends, RuntimeError where a sample does not decode (the pipeline is then unusable)."""
        ...

    def checkpoint(self) -> Checkpoint:
        """The position and every random state: a pipeline built from it yields what this one yields next."""
        ...

    def reset(self) -> None:
        """After StopIteration: start the next epoch."""
        ...

    def close(self) -> None:
        """Stop the pipeline's threads now (what they decode ahead too)."""
        ...


PipelineFactory = Callable[[DaliGraph, Checkpoint | None], Pipeline]


class DaliPipeline:
    """`graph` built as a DALI pipeline at `checkpoint` (None: from its seed); the default PipelineFactory."""

    def __init__(self, graph: DaliGraph, checkpoint: Checkpoint | None):
        self.dali = build_pipeline(graph, checkpoint)
        self.operators = operator_count(self.dali)
        self.decoders = decoder_ops(self.dali)

    def run(self, stream: torch.cuda.Stream | None = None) -> tuple:
        return self.dali.run() if stream is None else self.dali.run(stream)

    def checkpoint(self) -> Checkpoint:
        return self.dali.checkpoint()

    def reset(self) -> None:
        self.dali.reset()

    def close(self) -> None:
        """End the pipeline inside a capture: its threads may still be decoding ahead, and printing (left to the
        garbage collector, they would do so after the capture had ended). DALI 2.4 has no public call for it: its
        `_shutdown` is what its own __del__ calls."""
        shutdown = getattr(self.dali, "_shutdown", None)
        if shutdown is not None:
            with native_stderr():
                shutdown()


class DecodeFailures:
    """What the training pipeline does with an encoded file that does not decode: names it (batch_failure: from
    DALI's error, else by reading the batch again from the checkpoint taken before it), and, when the source skips
    bad files, stands another good file in for it (the source's replace_bad: its list keeps its length and order, so
    positions, epochs, shards and DALI's checkpoint stay valid). `skipped` lists the replacements, `on_skip` is
    called with each (name, reason) (the trainer logs it)."""

    def __init__(self, source: EncodedSource, graph: DaliGraph, shard_id: int, num_shards: int):
        self.source = source
        self.shard = (shard_id, num_shards)
        self.batch_size, self.num_threads = graph.batch_size, graph.num_threads
        self.skipped: list[tuple[str, str]] = []  # (file or shard:offset:member, DALI's reason) replaced so far
        self.on_skip: Callable[[str, str], None] | None = None

    def replace(self, error_text: str, before: Checkpoint, printed: Captured) -> FastByolError | None:
        """None when the failed file was replaced (rebuild at `before` and run the batch again), else the one-line
        error to raise; `printed`: what native code printed meanwhile, folded in."""
        bad, why = batch_failure(self.source, error_text, before, *self.shard, self.batch_size, self.num_threads)
        reason = fold(why, printed)
        if bad is not None and self.source.skip_bad and self.source.replace_bad(bad):
            self.skipped.append((bad, reason))
            if self.on_skip is not None:
                self.on_skip(bad, reason)
            return None
        where = self.source.where or "the encoded source"
        return FastByolError(f"{bad}: {reason}" if bad else f"DALI failed on a batch of {where}: {reason}")


class GraphRunner:
    """A DaliGraph's pipeline, run batch after batch (module docstring).

    failures: an encoded source's (a checkpoint is then taken before each batch, ~0.1 ms on the CPU, to rebuild at);
    None for arrays, whose errors are raised as they are. release: called before the pipeline is rebuilt or closed
    (the CUDA chain may still read the old pipeline's buffers)."""

    def __init__(self, graph: DaliGraph, checkpoint: Checkpoint | None, make_pipeline: PipelineFactory,
                 failures: DecodeFailures | None, release: Callable[[], None]):
        self.graph = graph
        self.make_pipeline = make_pipeline
        self.failures = failures
        self.release = release
        self.native = NativeWindow()  # encoded sources: fd 2 from the first run() to close()
        self._closer = weakref.finalize(self, self.native.close)  # never closed: the garbage collector gives fd 2 back
        try:
            self._pipe = make_pipeline(graph, checkpoint)
        except RuntimeError as e:  # DALI restores a checkpoint only into the graph that saved it
            if checkpoint is None:
                raise
            why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise FastByolError("the checkpoint's data position cannot be restored into this data pipeline (damaged, "
                                f"or saved for other data or settings): {why[:200]}") from None

    @property
    def operators(self) -> int:
        return self._pipe.operators

    @property
    def decoders(self) -> int:
        return self._pipe.decoders

    def run(self) -> tuple:
        """One batch of outputs. CUDA: bound to torch's current stream (DALI makes them ready there, instead of
        blocking the host until they are). A decode error of an encoded source is named, or the file replaced, the
        pipeline rebuilt from the checkpoint taken just before this batch (DALI 2.4 raises at the run() of the very
        batch that holds the file) and the batch run again. What native code printed since the previous run() and
        during this one is folded into the error."""
        on_gpu = self.graph.device_id is not None
        while True:
            before = self._pipe.checkpoint() if self.failures is not None else None
            ahead = self.native.take() if self.failures is not None else None  # printed while DALI worked ahead
            try:
                with native_stderr():  # libjpeg/libpng/DALI messages: folded into ours, never printed
                    return self._pipe.run(torch.cuda.current_stream() if on_gpu else None)
            except RuntimeError as e:  # a file that passed the header checks but does not decode
                if self.failures is None:
                    raise
                printed = self.native.take()
                printed.text = "\n".join(t for t in (ahead.text, printed.text) if t)
                error = self.failures.replace(str(e), before, printed)
                if error is not None:
                    self.native.close()
                    raise error from None
                self.rebuild(before)  # replaced: run the batch again

    def epoch(self) -> Iterator[tuple]:
        """The outputs of one array epoch (the source raises StopIteration at its end); restored exactly at an
        epoch's end, the next epoch's."""
        yielded, retried = 0, False
        while True:
            try:
                outputs = self.run()
            except StopIteration:
                self._pipe.reset()
                if yielded == 0 and not retried:  # restored exactly at an epoch's end: start the next
                    retried = True
                    continue
                return
            yielded += 1
            yield outputs

    def checkpoint(self) -> Checkpoint:
        return self._pipe.checkpoint()

    def reset(self) -> None:
        self._pipe.reset()

    def end_capture(self) -> None:
        """Give fd 2 back until the next run()."""
        self.native.close()

    def rebuild(self, checkpoint: Checkpoint) -> None:
        """A fresh pipeline at `checkpoint` (one that raised is no longer valid)."""
        self.release()
        self._pipe.close()
        self._pipe = None
        self._pipe = self.make_pipeline(self.graph, checkpoint)

    def close(self) -> None:
        """Stop DALI (what it decodes ahead too) and give fd 2 back; the runner is unusable afterwards."""
        if self._pipe is not None:
            self.release()
            self._pipe.close()
            self._pipe = None
        self._closer()
