"""`TwoViewLoader`: BYOL's two augmented views of a uint8 array or of encoded files, as torch tensors (B, 3, S, S),
channels_last, normalized (float32 on the CPU, float16 on CUDA). Every image draws its own random parameters (crop,
flip, jitter factors and order, coins): DALI's random ops draw per sample, never one crop per batch.

The loader is thin: it picks one DALI graph (fastbyol.augment.pipelines) and one view maker (fastbyol.augment.makers)
for its path, runs the graph (fastbyol.augment.runner: the pipeline and its rebuild, native output, bad files
replaced under --skip-bad-files), and hands each batch of outputs to the maker. The paths:
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
and saturation and hue in true HSV (tests/test_augment_fidelity.py checks each op against a numpy port of the
official op, the whole chain on the loader's own draws, each probability and parameter range, and the crops' area
and aspect).

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
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import AugmentConfig, validate_section
from ..data.dataset import EncodedSource
from ..errors import FastByolError
from ..system.bounds import check_address_space
from . import pipelines
from .makers import CpuViews, GpuViews, ProcessViews
from .photometric import TAP_TAIL, ChainSpec
from .runner import Checkpoint, DaliPipeline, DecodeFailures, GraphRunner, PipelineFactory
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


@dataclass(frozen=True)
class LoaderSettings:
    """What a TwoViewLoader yields and where it runs (how the work is done is the run's AugmentConfig)."""

    batch_size: int  # images a batch, of this shard
    image_size: int  # side of each view, px
    seed: int = 0  # DALI's seed is seed + shard_id
    device: str = "cpu"  # "cpu": DALI with device_id=None, the chain in torch; "cuda": the GPU decodes and crops
    num_threads: int = 2  # DALI's threads, and the CPU chain's workers (threads or processes)
    shard_id: int = 0
    num_shards: int = 1
    gray_input: bool = False  # every image has R = G = B: the CPU path crops and runs the chain on one plane
    views: tuple[ViewSpec, ViewSpec] = (VIEW1, VIEW2)  # e.g. fastbyol.augment.views_from_config(cfg)


class TwoViewLoader:
    """Iterate epochs of (view1, view2): each (B, 3, S, S) channels_last, normalized, on the settings' device, a
    fresh torch tensor (the chain's output), never a view of DALI's memory; float32 on the CPU (the CPU trainer's
    dtype), float16 on CUDA.

    source: a uint8 (N, H, W, 3) array (fed by external_source), or an EncodedSource (fastbyol.data.dataset: a
    FileList of a folder or tar shards). augment: how the work runs (AugmentConfig: the CUDA chain's backend, the
    decode mode, the decoder hints, the CPU chunk size, processes or threads). checkpoint: a state() to resume from.
    The online probe's labels, each batch then (view1, view2, labels (B,) int64 on the views' device), the draws
    unchanged: `labels`, (N,) class labels of an array source, gathered by the rows DALI's source named (CPU: the rows
    it emits anyway; CUDA: a second output of the same source, pipelines.array_source); or `reader_labels`, for an
    encoded source that is `labelled`: its reader's labels as the graph's last output (pipelines' docstring).
    make_pipeline: builds the graph's pipeline (runner.Pipeline; tests pass a wrapper or a fake)."""

    def __init__(self, source, settings: LoaderSettings, augment: AugmentConfig | None = None,
                 checkpoint: Checkpoint | None = None, *, labels: np.ndarray | None = None,
                 reader_labels: bool = False, make_pipeline: PipelineFactory = DaliPipeline):
        augment = augment or AugmentConfig()
        validate_section(augment, name=str)
        if not dali_available():
            raise FastByolError("NVIDIA DALI is not installed: pip install 'fastbyol[cuda13]' (or [cuda12])")
        # DALI's threads abort where the address-space limit is met
        check_address_space(settings.num_threads, settings.batch_size, settings.image_size)
        settings.views[0].validate("view1")
        settings.views[1].validate("view2")
        self.settings = settings
        self.encoded = isinstance(source, EncodedSource)
        self.on_gpu = settings.device.startswith("cuda")
        self.decode = augment.decode
        self.photometric_backend = augment.cuda_photometric if self.on_gpu else "reference"
        self.cpu_parallel = augment.cpu_parallel if not (self.on_gpu or self.encoded) else "threads"
        self.labels = _array_labels(labels, source, self.encoded)  # (N,) int64 gathered per batch, or None
        self.reader_labels = _reader_labels(reader_labels, source, self.encoded)
        self.with_labels = self.labels is not None or self.reader_labels
        chains = tuple(self._chain(spec, augment.chunk_pixels) for spec in settings.views)
        graph, per_shard, self.steps_per_epoch, array = _pick_graph(source, settings, augment, self.reader_labels,
                                                                    self.labels is not None)
        if self.steps_per_epoch == 0:
            raise FastByolError(f"batch size {settings.batch_size} is larger than the {per_shard} images of "
                                "this shard: lower --batch-size")
        self.maker = _view_maker(settings, chains, array, self.cpu_parallel, self.photometric_backend)
        # the outputs by name: the maker's, then the labels (reader) or the source's rows (CUDA arrays) where asked
        extra = ("labels",) if self.reader_labels else ("rows",) if self.on_gpu and self.labels is not None else ()
        self.output_names = self.maker.outputs + extra
        self._labels = BatchLabels(self.labels, self.reader_labels, self.on_gpu, self.output_names)
        failures = DecodeFailures(source, graph, settings.shard_id, settings.num_shards) if self.encoded else None
        self._failures = failures
        self._runner = GraphRunner(graph, checkpoint, make_pipeline, failures, self.maker.release)
        self._ahead = LookAhead(self._runner, self.maker, self._labels) if self.cpu_parallel == "processes" else None

    def _chain(self, spec: ViewSpec, chunk_pixels: int) -> ChainSpec:
        """The photometric chain's constants for one view (what every batch's chain takes besides crops and
        params)."""
        # the CPU path: blur taps below float32 resolution skipped (ChainSpec.blur_tail), the run's chunk size
        cpu = {} if self.on_gpu else dict(blur_tail=TAP_TAIL, chunk_pixels=chunk_pixels)
        return ChainSpec(blur_window=spec.blur_window(self.settings.image_size),
                         solarize_threshold=spec.solarize_threshold, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         gray_input=self.settings.gray_input,
                         out_dtype=torch.float16 if self.on_gpu else torch.float32, **cpu)

    @property
    def operators(self) -> int:
        """Operators in the DALI graph; -1 if this DALI version does not say (pipelines.operator_count)."""
        return self._runner.operators

    @property
    def decoders(self) -> int:
        """Image decoders in the DALI graph (CUDA JPEG path: 2 for decode "roi", 1 for "once"; CPU files: 1;
        arrays: 0); -1 if this DALI version does not say."""
        return self._runner.decoders

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(file or shard:offset:member, DALI's reason) of the files replaced so far (--skip-bad-files)."""
        return self._failures.skipped if self._failures is not None else []

    @property
    def on_skip(self) -> Callable[[str, str], None] | None:
        """Called with (name, reason) after each replacement (the trainer logs it); arrays have none."""
        return self._failures.on_skip if self._failures is not None else None

    @on_skip.setter
    def on_skip(self, call: Callable[[str, str], None] | None) -> None:
        if self._failures is not None:
            self._failures.on_skip = call

    def state(self) -> Checkpoint:
        """The pipeline's position (epoch, iteration) and every random state, as DALI's checkpoint string: a loader
        built with checkpoint=state() yields exactly the batches this one would have yielded next. (While the CPU
        workers compute a batch ahead, that is the checkpoint taken before DALI drew it.)"""
        ahead = self._ahead.checkpoint() if self._ahead is not None else None
        return ahead if ahead is not None else self._runner.checkpoint()

    def draw(self) -> dict:
        """The next batch of DALI outputs by name (output_names), without views: what `maker.crops`, `maker.chain`
        and `batch_labels` take, for tests and tools that check what the chain reads. Raises StopIteration at an
        array epoch's end (the next draw starts the next epoch)."""
        try:
            return dict(zip(self.output_names, self._runner.run()))
        except StopIteration:
            self._runner.reset()
            raise
        finally:
            self._runner.end_capture()

    def close(self) -> None:
        """Stop DALI (what it decodes ahead too) and give fd 2 back; the loader is unusable afterwards (the trainer
        calls it at a run's end; for a loader never closed the garbage collector gives fd 2 back)."""
        self._runner.close()

    def epoch(self, first_step: int = 0) -> Iterator[tuple]:
        """Yield this epoch's batches of (view1, view2), from batch `first_step` on (after a resume).

        Arrays: one shuffled pass, the last partial batch dropped; a restored position continues the epoch it was
        saved in. Encoded files: steps_per_epoch batches of the reader's stream, which reshuffles after each of its
        own passes, so every image is read once per N images."""
        if self._ahead is not None:
            yield from self._ahead.epoch()
            return
        batches = (self._runner.run() for _ in range(first_step, self.steps_per_epoch)) if self.encoded \
            else self._runner.epoch()
        for outputs in batches:
            views = self.maker(outputs)
            yield _labelled(views, self._labels(outputs))

    def batch_labels(self, out: dict) -> torch.Tensor | None:
        """The labels of a batch of outputs by name (draw()'s), as epoch() yields them (BatchLabels.of)."""
        return self._labels.of(out)


@dataclass(frozen=True)
class BatchLabels:
    """Each batch's labels for the online probe, from its DALI outputs: an array source's (rows: (N,) int64,
    gathered by the rows DALI's source named: CPU "pixels", CUDA "rows"), or the reader's ("labels")."""

    rows: torch.Tensor | None
    reader: bool
    on_gpu: bool
    names: tuple[str, ...]  # the outputs' names, in order

    def __call__(self, outputs: tuple) -> torch.Tensor | None:
        return self.of(dict(zip(self.names, outputs))) if self.rows is not None or self.reader else None

    def of(self, out: dict) -> torch.Tensor | None:
        """(B,) int64, a copy (DALI reuses its buffers); on the GPU for CUDA (a pinned copy, queued: no host sync).
        None without labels."""
        if self.rows is not None:
            index = torch.from_dlpack(out["rows" if self.on_gpu else "pixels"].as_tensor()).reshape(-1)
            labels = self.rows.index_select(0, index)
        elif self.reader:
            labels = torch.from_dlpack(out["labels"].as_tensor()).reshape(-1).to(torch.int64, copy=True)
        else:
            return None
        return labels.pin_memory().to("cuda", non_blocking=True) if self.on_gpu else labels


def _labelled(views: tuple, labels: torch.Tensor | None) -> tuple:
    return views if labels is None else (*views, labels)


class LookAhead:
    """epoch() for CPU arrays with worker processes: DALI draws batch n + 1 and the workers start on it before batch n
    is yielded, so they compute while the consumer uses n. While batches drawn are not yet yielded, checkpoint() is
    the one taken before DALI drew the oldest of them, and whatever ends the iterator early (the consumer stops, an
    error or Ctrl-C anywhere in it, a later epoch() call) gives them back: the workers drained, the pipeline rebuilt
    at that checkpoint. So the batches, and resume, are exactly those of the synchronous path.

    labels: each batch's labels, taken as it is drawn."""

    def __init__(self, runner: GraphRunner, maker: ProcessViews, labels: BatchLabels):
        self.runner, self.maker, self.labels = runner, maker, labels
        self._pending = None  # (the iterator that drew them, the checkpoint before the oldest batch not yielded)
        self._owner = None  # the epoch iterator that may run

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint before the oldest batch drawn and not yielded; None when there is none."""
        return self._pending[1] if self._pending is not None else None

    def epoch(self) -> Iterator[tuple]:
        if self._pending is not None:  # an earlier iterator, suspended with a batch drawn ahead, ends here
            self.give_back()
        token = self._owner = object()
        queue: collections.deque = collections.deque()  # (slot, checkpoint before it, labels): drawn, not yielded

        def mark() -> None:  # what checkpoint() and a give-back need: the checkpoint before the oldest not yielded
            self._pending = (token, queue[0][1]) if queue else None

        slot, retried = 0, False
        try:
            while True:
                before = self.runner.checkpoint()  # after every batch drawn so far
                try:
                    outputs = self.runner.run()
                except StopIteration:  # the external source ended the epoch
                    self.runner.reset()
                    if not queue and not retried:  # restored exactly at an epoch's end: start the next
                        retried = True
                        continue
                    outputs = None
                if outputs is not None:
                    self.maker.submit(outputs, slot)
                    queue.append((slot, before, self.labels(outputs)))
                    slot = 1 - slot
                    mark()
                if len(queue) == 2 or (outputs is None and queue):  # the next one is with the workers
                    slot_done, _, labels = queue.popleft()
                    views = self.maker.collect(slot_done)
                    mark()
                    yield _labelled(views, labels)
                    if self._owner is not token:
                        raise FastByolError("this epoch() iterator was ended by a later epoch() call on the same "
                                            "loader (one iterator at a time)")
                if outputs is None:
                    break
        finally:
            if self._pending is not None and self._pending[0] is token:
                self.give_back()

    def give_back(self) -> None:
        """The batches drawn ahead back: the workers drained, DALI rebuilt at the checkpoint taken before them."""
        before = self._pending[1]
        self._pending = None
        try:
            self.maker.drain()
        except FastByolError:
            pass  # the workers failed or were closed; their next use raises
        self.runner.rebuild(before)


def _array_labels(labels, source, encoded: bool) -> torch.Tensor | None:
    """labels= checked: (N,) int64, one per image of an array source, or None."""
    if labels is None:
        return None
    if encoded:
        raise FastByolError("labels= is one label per image of an array source; an encoded source's batches carry "
                            "its reader's labels (reader_labels=True)")
    if len(labels) != len(source):
        raise FastByolError("labels= for image arrays is one label per image: the batch's labels are gathered by "
                            "the rows DALI's source names, so the draws stay the same")
    return torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _reader_labels(wanted: bool, source, encoded: bool) -> bool:
    """reader_labels= checked: an encoded source whose every file has a label its DALI reader emits."""
    if wanted and not (encoded and source.labelled):
        raise FastByolError("reader_labels=True is for encoded files that are all labelled (their DALI reader emits "
                            "each file's label)")
    return wanted


def _array_tensor(images) -> torch.Tensor:
    """The array source as a (N, H, W, 3) uint8 tensor sharing the caller's memory, or a FastByolError."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise FastByolError(f"images must be uint8 (N, H, W, 3), got {got}")
    with warnings.catch_warnings():  # a read-only array (a memory map) is fine: the loader never writes it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(images)


def _pick_graph(source, settings: LoaderSettings, augment: AugmentConfig, reader_labels: bool, rows: bool):
    """(the DaliGraph, images a shard, steps an epoch, the array source's tensor or None). reader_labels: the files
    graphs emit the reader's labels; rows: the CUDA arrays graph emits the source's rows."""
    s, on_gpu = settings, settings.device.startswith("cuda")
    if isinstance(source, EncodedSource):
        per_shard, array = len(source) // s.num_shards, None
        fn, args = (pipelines.gpu_files, (source, s.shard_id, s.num_shards, s.views, s.image_size, augment,
                                          reader_labels)) if on_gpu \
            else (pipelines.cpu_files, (source, s.shard_id, s.num_shards, s.views, reader_labels))
        steps = per_shard // s.batch_size
    else:
        array = _array_tensor(source)  # (N, H, W, 3) uint8, shared with the caller's array
        epochs = pipelines.EpochSource(source, s.batch_size, s.seed, s.shard_id, s.num_shards,
                                       indices_only=not on_gpu, with_rows=on_gpu and rows)
        fn, args = (pipelines.gpu_arrays, (epochs, s.views, s.image_size, rows)) if on_gpu \
            else (pipelines.cpu_arrays, (epochs, tuple(source.shape[1:3]), s.views))
        per_shard, steps = epochs.per_shard, epochs.steps_per_epoch
    device_id = torch.cuda.current_device() if on_gpu else None
    graph = pipelines.DaliGraph(fn, args, s.batch_size, s.num_threads, device_id, s.seed + s.shard_id)
    return graph, per_shard, steps, array


def _view_maker(settings: LoaderSettings, chains: tuple[ChainSpec, ChainSpec], array: torch.Tensor | None,
                cpu_parallel: str, backend: str):
    """The path's view maker (CPU arrays with processes: forked here, before DALI starts threads)."""
    channels = 1 if settings.gray_input else 3
    if settings.device.startswith("cuda"):
        return GpuViews(chains, backend)
    if cpu_parallel == "processes":
        return ProcessViews(array, settings.image_size, channels, chains, settings.num_threads, settings.batch_size)
    return CpuViews(array, settings.image_size, channels, chains, settings.num_threads)
