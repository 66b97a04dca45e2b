"""`TwoViewLoader`: BYOL's two augmented views of a uint8 array or of encoded files, as torch tensors (B, 3, S, S),
channels_last, normalized (float32 on the CPU, float16 on CUDA). Every image draws its own random parameters (crop,
flip, jitter factors and order, coins): DALI's random ops draw per sample, never one crop per batch.

The loader is thin: it picks one DALI graph (fastbyol.augment.pipelines) and one view maker (fastbyol.augment.makers)
for its path, runs the graph (standing in good files for bad ones under --skip-bad-files), and hands each batch of
outputs to the maker. The paths:
- CUDA (arrays or files): DALI also decodes (the mixed decoder; `decode` "roi": one ROI decode per view, "once": one
  whole decode and both views cropped from it), resizes (bicubic), flips and emits planar uint8 crops; the chain
  runs as AugmentConfig.cuda_photometric says.
- CPU: DALI reads and decodes files (arrays are rows the source names by index); torch crops, resizes and flips
  (fastbyol.augment.crops: torch's uint8 bicubic is ~10x faster than DALI's CPU resize) and runs the chain
  (fastbyol.augment.photometric.photometric). Array sources: in `num_threads` forked worker processes, one batch ahead
  (cpu_parallel "processes", the default: fastbyol.augment.cpu_workers; the chain's small ops hold the GIL, so threads
  mostly wait for each other); encoded files (or cpu_parallel "threads"): on `num_threads` worker threads. Both give
  the same batches, bit for bit.
The chain: colour jitter with p 0.8 (the four ops in the image's own random order, a clip after each) -> grayscale ->
blur -> solarize -> clip -> normalize -> channels_last, on [0, 1] floats, with contrast around each channel's mean
and saturation and hue in true HSV (tests/test_augment_fidelity.py checks each op against a numpy port of the official op,
the whole chain on the loader's own draws, each probability and parameter range, and the crops' area and aspect).

Deviations left, and why:
- the crop window is drawn by DALI's sampler, the official by TF's sample_distorted_bounding_box (the same scheme,
  10 attempts; TF also asks the window to cover 10% of the image, min_object_covered=0.1);
- the crops are rounded to uint8 (<= 0.5/255) before the float ops (the official resize outputs floats);
- CUDA: DALI's bicubic filter may use another cubic coefficient than TF's Keys a = -0.5;
- CPU: torch's uint8 bicubic is TF's (Keys a = -0.5, half-pixel centres; tested within one level when enlarging)
  but antialiases when shrinking (TF does not), and rounds to uint8 between its two passes (it differs from a float
  resize only where the first pass overshoots [0, 255], at pixel-level edges).
The blur pads with zeros, as the official depthwise convolution.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
import weakref

import numpy as np
import torch

from ..config import AugmentConfig, validate_section
from ..errors import FastByolError
from ..system.bounds import check_address_space
from ..system.native import NativeWindow, fold, native_stderr
from .photometric import TAP_TAIL
from . import pipelines
from .makers import CpuViews, GpuViews, ProcessViews
from .views import IMAGENET_MEAN, IMAGENET_STD, VIEW1, VIEW2, ViewSpec


def dali_available() -> bool:
    """Whether DALI is installed; a DALI that is installed but cannot load (its libraries refused by the address-space
    limit, a broken install) is a FastByolError saying why, not "not installed"."""
    try:
        import nvidia.dali  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name in ("nvidia", "nvidia.dali"):
            return False
        raise FastByolError(f"NVIDIA DALI is installed but cannot load: {e}") from None
    except ImportError as e:
        from ..system.paths import address_space_note

        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FastByolError(f"NVIDIA DALI is installed but cannot load ({why}){address_space_note()}") from None
    return True


def augment_options(augment: AugmentConfig | None, overrides: dict) -> AugmentConfig:
    """The run's AugmentConfig (default: the defaults) with keyword overrides (decode="once", ...), checked: a bad
    value or an unknown name is one FastByolError naming it."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(AugmentConfig)})
    if unknown:
        raise TypeError(f"TwoViewLoader got an unexpected keyword argument {unknown[0]!r}")
    options = dataclasses.replace(augment or AugmentConfig(), **overrides)
    validate_section(options, name=str)
    return options


def _array_tensor(images) -> torch.Tensor:
    """The array source as a (N, H, W, 3) uint8 tensor sharing the caller's memory, or a FastByolError."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise FastByolError(f"images must be uint8 (N, H, W, 3), got {got}")
    with warnings.catch_warnings():  # a read-only array (a memory map) is fine: the loader never writes it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(images)


class TwoViewLoader:
    """Iterate epochs of (view1, view2): each (B, 3, S, S) channels_last, normalized, on `device`, a fresh torch
    tensor (the chain's output), never a view of DALI's memory; float32 on the CPU (the CPU trainer's dtype), float16
    on CUDA.

    source: a uint8 (N, H, W, 3) array (fed by external_source), or an encoded-file source
    (fastbyol.data.dataset.EncodedSource: FileList or tar shards). device "cpu" runs DALI with device_id=None and the
    chain with torch on the CPU; "cuda" decodes on the GPU (the "mixed" decoder). views: (view 1, view 2), e.g.
    fastbyol.augment.views_from_config(cfg). augment: how the work runs (AugmentConfig: the CUDA chain, the decode
    mode, the decoder hints, the CPU chunk size, processes or threads); any of its fields may also be given as a
    keyword (decode="once", cpu_parallel="threads") to override it. checkpoint: a state() to resume from. labels
    (the online probe's): (N,) class labels of an array source, gathered by the rows DALI's source named (CPU: the
    rows it emits anyway; CUDA: a second output of the same source, pipelines.array_source); or True for an encoded source that is `labelled` (CPU or CUDA), its reader's labels as the graph's last output
    (pipelines' docstring). Each batch is then (view1, view2, labels (B,) int64, on the views' device); the draws
    stay the same. `with_labels` says whether batches carry them (False after a fallback: `labels_note`).
    """

    def __init__(self, images, batch_size: int, image_size: int, seed: int = 0, device: str = "cpu",
                 num_threads: int = 2, view1: ViewSpec = VIEW1, view2: ViewSpec = VIEW2, shard_id: int = 0,
                 num_shards: int = 1, gray_input: bool = False, checkpoint: bytes | str | None = None,
                 augment: AugmentConfig | None = None, labels: np.ndarray | None = None, **overrides):
        options = augment_options(augment, overrides)
        if not dali_available():
            raise FastByolError("NVIDIA DALI is not installed: pip install 'fastbyol[cuda13]' (or [cuda12])")
        check_address_space(num_threads, batch_size, image_size)  # DALI's threads abort where the limit is met
        view1.validate("view1")
        view2.validate("view2")
        self.encoded = hasattr(images, "dali_reader")
        self.encoded_source = images if self.encoded else None
        self.on_gpu = device.startswith("cuda")
        self.batch_size, self.image_size, self.num_threads = batch_size, image_size, num_threads
        self.decode = options.decode
        self.photometric_variant = options.cuda_photometric if self.on_gpu else "reference"
        self.cpu_parallel = options.cpu_parallel if not (self.on_gpu or self.encoded) else "threads"
        # array labels: (N,) int64 gathered per batch; reads_labels: the files graph's last output is the labels
        self.labels, self.reads_labels = _probe_labels(labels, images, self.encoded, self.on_gpu)
        self.labels_note = None  # why batches carry no labels although they were asked for (_first_pipeline)
        views = (view1, view2)
        chains = tuple(self._chain(spec, gray_input, options.chunk_pixels) for spec in views)
        graph, per_shard, self._steps, array = _pick_graph(images, batch_size, image_size, seed, self.on_gpu,
                                                           shard_id, num_shards, views, options, self.reads_labels,
                                                           self.labels is not None)
        if self._steps == 0:
            raise FastByolError(f"batch size {batch_size} is larger than the {per_shard} images of "
                                "this shard: lower --batch-size")
        channels = 1 if gray_input else 3
        # CPU arrays with processes: forked here, before DALI starts threads
        self._procs = None
        if self.on_gpu:
            self.maker = GpuViews(chains, self.photometric_variant)
        elif self.cpu_parallel == "processes":
            self.maker = ProcessViews(array, image_size, channels, chains, num_threads, batch_size)
            self._procs = self.maker.procs
        else:
            self.maker = CpuViews(array, image_size, channels, chains, num_threads)
        device_id = torch.cuda.current_device() if self.on_gpu else None
        self._graph = (*graph, batch_size, num_threads, device_id, seed + shard_id)
        # --skip-bad-files in the training pipeline: a source that can stand another file in for one DALI cannot
        # decode (replace_bad) and says it may (skip_bad); see _run.
        self.skip_bad = self.encoded and bool(getattr(images, "skip_bad", False)) and hasattr(images, "replace_bad")
        self.skipped: list[tuple[str, str]] = []  # (file or shard:offset:member, DALI's reason) replaced so far
        self.on_skip = None  # called with (name, reason) after each replacement (the trainer logs it)
        self._ahead = None  # (epoch iterator, checkpoint before the oldest batch drawn, not yielded) (epoch_ahead)
        self._owner = None  # the epoch iterator of the processes path that may run
        self._shard = (shard_id, num_shards)
        # encoded sources: fd 2 from the first run() to close() (DALI works ahead across epochs: the window too)
        self._native = NativeWindow()
        self._closer = weakref.finalize(self, self._native.close)
        self._pipe = _first_pipeline(self, checkpoint)
        self.with_labels = self.labels is not None or self.reads_labels

    def _chain(self, spec: ViewSpec, gray_input: bool, chunk_pixels: int) -> dict:
        """The photometric chain's arguments for one view (all but crops and params)."""
        kwargs = dict(blur_window=spec.blur_window(self.image_size), solarize_threshold=spec.solarize_threshold,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, gray_input=gray_input,
                      out_dtype=torch.float16 if self.on_gpu else torch.float32)
        if not self.on_gpu:  # blur taps below float32 resolution skipped (photometric's docstring)
            kwargs.update(blur_tail=TAP_TAIL, chunk_pixels=chunk_pixels)
        return kwargs

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    @property
    def operators(self) -> int:
        """Operators in the DALI graph; -1 if this DALI version does not say (pipelines.operator_count)."""
        return pipelines.operator_count(self._pipe)

    @property
    def decoders(self) -> int:
        """Image decoders in the DALI graph (CUDA JPEG path: 2 for decode "roi", 1 for "once"; CPU files: 1;
        arrays: 0); -1 if this DALI version does not say."""
        return pipelines.decoder_ops(self._pipe)

    def state(self) -> bytes | str:
        """The pipeline's position (epoch, iteration) and every random state, as DALI's checkpoint string: a loader
        built with checkpoint=state() yields exactly the batches this one would have yielded next. (While the CPU
        workers compute a batch ahead, that is the checkpoint taken before DALI drew it.)"""
        return self._ahead[1] if self._ahead is not None else self._pipe.checkpoint()

    def draw(self) -> dict:
        """The next batch of DALI outputs by name (the maker's `outputs`), without views: what `maker.crops` and
        `maker.chain` take, for tests and tools that check what the chain reads. Raises StopIteration at an epoch's
        end (arrays)."""
        try:
            return dict(zip(self.maker.outputs, self._run()))
        finally:
            self._native.close()

    def _run(self):
        """One batch of DALI outputs. CUDA: bound to torch's current stream (DALI makes them ready there, instead
        of blocking the host until they are).

        A file that passed the header checks but does not decode ends the run with one FastByolError naming it, or,
        when the source skips bad files, is replaced: the source stands another good file in for it (its list keeps
        its length and order, so positions, epochs, shards and DALI's checkpoint stay valid), the pipeline is
        rebuilt from DALI's checkpoint taken just before this batch (DALI 2.4 raises a decode error at the run()
        of the very batch that holds the file, and a pipeline that raised is no longer usable), and the batch is
        run again. When DALI's error names no sample, the batch is read again from that checkpoint to find it
        (decode.batch_failure). The checkpoint (~0.1 ms a batch on the CPU) is taken for encoded sources only.
        What native code printed since the previous run() (DALI works ahead) and during this one is folded in."""
        while True:
            before = self._pipe.checkpoint() if self.encoded else None
            ahead = self._native.take() if self.encoded else None  # printed while DALI worked ahead
            try:
                with native_stderr():  # libjpeg/libpng/DALI messages: folded into ours, never printed
                    return self._pipe.run(torch.cuda.current_stream()) if self.on_gpu else self._pipe.run()
            except RuntimeError as e:  # a file that passed the header checks but does not decode
                if not self.encoded:
                    raise
                _replace_or_raise(self, str(e), before, ahead)  # replaced: run the batch again

    def _rebuild(self, checkpoint) -> None:
        """A fresh pipeline at DALI checkpoint `checkpoint` (the one that raised is no longer valid)."""
        self.maker.release()  # CUDA: the chain's kernels still reading the old pipeline's buffers
        self._pipe = _end_pipeline(self._pipe)
        self._pipe = pipelines.build_pipeline(*self._graph, checkpoint)

    def close(self) -> None:
        """Stop DALI (what it decodes ahead too) and give fd 2 back; the loader is unusable afterwards (the trainer
        calls it at a run's end; for a loader never closed the garbage collector gives fd 2 back)."""
        if self._pipe is not None:
            self.maker.release()
            self._pipe = _end_pipeline(self._pipe)
        self._closer()

    def epoch(self, first_step: int = 0):
        """Yield this epoch's batches of (view1, view2), from batch `first_step` on (after a resume).

        Arrays: one shuffled pass, the last partial batch dropped; a restored position continues the epoch it was
        saved in. Encoded files: steps_per_epoch batches of the reader's stream, which reshuffles after each of its
        own passes, so every image is read once per N images."""
        if self.encoded:
            for _ in range(first_step, self._steps):
                outputs = self._run()
                yield self._labelled(self.maker(outputs), self.batch_labels(outputs))
            return
        if self._procs is not None:
            yield from epoch_ahead(self)
            return
        for outputs in self._array_batches():
            yield self._labelled(self.maker(outputs), self.batch_labels(outputs))

    def batch_labels(self, outputs) -> torch.Tensor | None:
        """The batch's labels (B,) int64, a copy (DALI reuses its buffers): arrays, those of the rows DALI's source
        named (CPU: outputs[0]; CUDA: the last output); encoded files, the reader's (the last output); on the GPU for
        CUDA (a pinned copy, queued: no host sync). None without labels."""
        if self.labels is not None:  # the rows: CPU, the first output; CUDA, the last (a CPU output)
            rows = torch.from_dlpack(outputs[-1 if self.on_gpu else 0].as_tensor()).reshape(-1)
            labels = self.labels.index_select(0, rows)
            return labels.pin_memory().to("cuda", non_blocking=True) if self.on_gpu else labels
        if not self.reads_labels:
            return None
        labels = torch.from_dlpack(outputs[-1].as_tensor()).reshape(-1).to(torch.int64, copy=True)
        return labels.pin_memory().to("cuda", non_blocking=True) if self.on_gpu else labels

    @staticmethod
    def _labelled(views: tuple, labels: torch.Tensor | None) -> tuple:
        return views if labels is None else (*views, labels)

    def _array_batches(self):
        """The DALI outputs of one array epoch; restored exactly at an epoch's end, the next epoch's."""
        yielded, retried = 0, False
        while True:
            try:
                outputs = self._run()
            except StopIteration:  # the external source ended the epoch
                self._pipe.reset()
                if yielded == 0 and not retried:  # restored exactly at an epoch's end: start the next
                    retried = True
                    continue
                return
            yielded += 1
            yield outputs


def _end_pipeline(pipe) -> None:
    """End a DALI pipeline now, inside a capture: its threads may still be decoding ahead, and printing (left to the
    garbage collector, they would do so after the capture had ended). None, for `self._pipe = _end_pipeline(...)`."""
    shutdown = getattr(pipe, "_shutdown", None)  # DALI's own end of a pipeline (what its __del__ calls)
    if shutdown is not None:
        with native_stderr():
            shutdown()


def _probe_labels(labels, images, encoded: bool, on_gpu: bool) -> tuple[torch.Tensor | None, bool]:
    """TwoViewLoader's labels= checked: (array labels (N,) int64 or None, whether the files graph emits labels)."""
    if labels is None or labels is False:
        return None, False
    if encoded:
        if labels is not True or not getattr(images, "labelled", False) or not hasattr(images, "dali_read"):
            raise FastByolError("labels= for encoded files is True, for a source whose files are all labelled "
                                "(dali_read: its DALI reader emits each file's label)")
        return None, True
    if labels is True or len(labels) != len(images):
        raise FastByolError("labels= for image arrays is one label per image: the batch's labels are gathered by "
                            "the rows DALI's source names, so the draws stay the same")
    return torch.as_tensor(np.asarray(labels, dtype=np.int64)), False


def _pick_graph(images, batch_size: int, image_size: int, seed: int, on_gpu: bool, shard_id: int, num_shards: int,
                views: tuple, options: AugmentConfig, labels: bool, rows: bool = False):
    """(graph function and its arguments, images a shard, steps an epoch, the array source's tensor or None).
    labels: the files graphs emit the reader's labels; rows: the CUDA arrays graph emits the source's rows."""
    if hasattr(images, "dali_reader"):
        per_shard = len(images) // num_shards
        graph = (pipelines.gpu_files, (images, shard_id, num_shards, views, image_size, options.decode,
                                       options.hw_decoder_load, options.preallocate_side, labels)) if on_gpu \
            else (pipelines.cpu_files, (images, shard_id, num_shards, views, labels))
        return graph, per_shard, per_shard // batch_size, None
    array = _array_tensor(images)  # (N, H, W, 3) uint8, shared with the caller's array
    source = pipelines.EpochSource(images, batch_size, seed, shard_id, num_shards, indices_only=not on_gpu,
                                   with_rows=on_gpu and rows)
    graph = (pipelines.gpu_arrays, (source, views, image_size, rows)) if on_gpu \
        else (pipelines.cpu_arrays, (source, tuple(images.shape[1:3]), views))
    return graph, source.per_shard, source.steps_per_epoch, array


def _first_pipeline(loader: TwoViewLoader, checkpoint):
    """The loader's pipeline, at `checkpoint`. DALI restores a checkpoint only into the graph that saved it: one saved
    without the files' labels output (before the labels reached the online probe) has no state for the label's
    operators. The graph is then built without them (the same draws: the label is its last output) and the batches
    carry no labels (loader.labels_note says why)."""
    try:
        return pipelines.build_pipeline(*loader._graph, checkpoint)
    except RuntimeError as e:
        if not (loader.reads_labels and checkpoint is not None and "no checkpoint for operator" in str(e)):
            _refuse_checkpoint(e, checkpoint)
            raise
    graph, args, *rest = loader._graph
    loader._graph = (graph, (*args[:-1], False), *rest)
    loader.reads_labels = False
    loader.labels_note = "the run's data checkpoint was saved by a DALI graph without the files' labels"
    try:
        return pipelines.build_pipeline(*loader._graph, checkpoint)
    except RuntimeError as e:
        _refuse_checkpoint(e, checkpoint)
        raise


def _refuse_checkpoint(e: RuntimeError, checkpoint) -> None:
    """A data checkpoint (from a run's checkpoint.pt: a file) that DALI cannot restore is one line, not DALI's
    traceback: damaged, or saved by a pipeline of other data or settings."""
    if checkpoint is None:
        return
    why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
    raise FastByolError(f"the checkpoint's data position cannot be restored into this data pipeline (damaged, or "
                        f"saved for other data or settings): {why}") from None


def _replace_or_raise(loader: TwoViewLoader, error_text: str, before, ahead) -> None:
    """TwoViewLoader._run's decode error: the file named (batch_failure), with what native code printed folded in;
    replaced and the pipeline rebuilt at `before` when the source skips bad files, else one FastByolError."""
    from ..data.decode import batch_failure

    printed = loader._native.take()
    printed.text = "\n".join(t for t in (ahead.text, printed.text) if t)
    src = loader.encoded_source
    bad, why = batch_failure(src, error_text, before, *loader._shard, loader.batch_size, loader.num_threads)
    reason = fold(why, printed)
    if bad is not None and loader.skip_bad and src.replace_bad(bad):
        loader.skipped.append((bad, reason))
        if loader.on_skip is not None:
            loader.on_skip(bad, reason)
        loader._rebuild(before)
        return
    loader._native.close()
    where = getattr(src, "where", None) or "the encoded source"
    raise FastByolError(f"{bad}: {reason}" if bad else f"DALI failed on a batch of {where}: {reason}") from None


def epoch_ahead(loader: TwoViewLoader):
    """epoch() for CPU arrays with worker processes: DALI draws batch n + 1 and the workers start on it before
    batch n is yielded, so they compute while the consumer uses n. While batches drawn are not yet yielded,
    loader._ahead holds (this iterator, the checkpoint taken before DALI drew the oldest of them): state() returns
    that checkpoint, and whatever ends the iterator early (the consumer stops, an error or Ctrl-C anywhere in it,
    a later epoch() call on the same loader) gives them back: the workers drained, the pipeline rebuilt at that
    checkpoint. So the batches, and resume, are exactly those of the synchronous path."""
    if loader._ahead is not None:  # an earlier epoch() iterator, suspended with a batch drawn ahead, ends here
        _give_back_ahead(loader)
    token = loader._owner = object()
    queue: collections.deque = collections.deque()  # (slot, checkpoint before it): drawn, not yielded

    def mark() -> None:  # what state() and a give-back need: the checkpoint before the oldest not yielded
        loader._ahead = (token, queue[0][1]) if queue else None

    slot, retried = 0, False
    try:
        while True:
            before = loader._pipe.checkpoint()  # after every batch drawn so far
            try:
                outputs = loader._run()
            except StopIteration:  # the external source ended the epoch
                loader._pipe.reset()
                if not queue and not retried:  # restored exactly at an epoch's end: start the next
                    retried = True
                    continue
                outputs = None
            if outputs is not None:
                loader.maker.submit(outputs, slot)
                queue.append((slot, before, loader.batch_labels(outputs)))
                slot = 1 - slot
                mark()
            if len(queue) == 2 or (outputs is None and queue):  # the next one is with the workers
                slot_done, _, labels = queue.popleft()
                views = loader.maker.collect(slot_done)
                mark()
                yield loader._labelled(views, labels)
                if loader._owner is not token:
                    raise FastByolError("this epoch() iterator was ended by a later epoch() call on the same "
                                        "loader (one iterator at a time)")
            if outputs is None:
                break
    finally:
        if loader._ahead is not None and loader._ahead[0] is token:
            _give_back_ahead(loader)


def _give_back_ahead(loader: TwoViewLoader) -> None:
    """The batch drawn ahead (loader._ahead) back: the workers drained, DALI rebuilt at the checkpoint taken before
    it was drawn."""
    before = loader._ahead[1]
    loader._ahead = None
    try:
        loader._procs.drain()
    except FastByolError:
        pass  # the workers failed or were closed; their next use raises
    loader._rebuild(before)
