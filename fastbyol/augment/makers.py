"""View makers: one batch of DALI's outputs (fastbyol.augment.pipelines) -> both views, one class per path.

- `GpuViews` (CUDA, arrays or files): the chain (AugmentConfig.cuda_photometric) reads DALI's crops in place
  (DLPack) on torch's stream; DALI's buffers are held until an event after the chain has passed.
- `CpuViews` (CPU, arrays or files, threads): torch crops the images (array rows, or DALI's decoded files) with
  DALI's windows (fastbyol.augment.crops), then runs the chain (fastbyol.augment.photometric), on `threads` worker
  threads.
- `ProcessViews` (CPU, arrays, processes): the same work in forked processes (fastbyol.augment.cpu_workers), one
  batch ahead of the consumer; the same views as CpuViews, bit for bit.
Each maker's `crops(out)` returns what the chain reads (both views' uint8 crops and float32 parameters) and
`chain(crops, params)` the views, so a test can check the chain against its reference on the loader's own draws;
`__call__(outputs)` is the two in a row, what the loader yields.
"""

from __future__ import annotations

import collections

import torch

from .photometric import ChainSpec, ScratchBuffers, photometric_many
from .photometric_backends import photometric_backend
from .crops import crop_resize_flip_many
from .pipelines import CPU_OUTPUTS, GPU_OUTPUTS


def _torch(node) -> torch.Tensor:
    """A DALI output (a dense batch) as a torch tensor over the same memory (DLPack, no copy)."""
    return torch.from_dlpack(node.as_tensor())


def _params(out: dict) -> list[torch.Tensor]:
    return [_torch(out[f"params{v}"]) for v in (1, 2)]  # (B, N_PARAMS) float32 each


class GpuViews:
    """CUDA: DALI's planar uint8 crops through the chain's `backend` (module docstring). chains: both views'
    ChainSpec."""

    outputs = GPU_OUTPUTS

    def __init__(self, chains: tuple[ChainSpec, ChainSpec], backend: str):
        self.chains = chains
        self.backend = backend
        self.buffers = ScratchBuffers()  # the Triton chain's scratch, reused batch after batch (grow-only)
        self._in_flight: collections.deque = collections.deque()  # (DALI outputs, event after their chain)

    def crops(self, out: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([crops (B, 3, S, S) uint8 per view], [params (B, N_PARAMS) float32 per view]), on the GPU, in place."""
        return [_torch(out[f"crops{v}"]) for v in (1, 2)], _params(out)

    def chain(self, crops: list[torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        chain = photometric_backend(self.backend)
        # both views share the scratch: their kernels run one after the other on torch's stream
        reuse = dict(buffers=self.buffers) if self.backend == "triton" else {}
        return tuple(chain(crops[v], params[v], self.chains[v], **reuse) for v in (0, 1))

    def __call__(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        views = self.chain(*self.crops(dict(zip(self.outputs, outputs))))
        # The chain's kernels are queued on torch's stream and read DALI's buffers: hold those buffers until an event
        # after the chain has passed (polled, no host sync), at most 4 batches (then wait for the oldest).
        event = torch.cuda.Event()
        event.record()
        self._in_flight.append((outputs, event))
        while self._in_flight and (len(self._in_flight) > 4 or self._in_flight[0][1].query()):
            self._in_flight[0][1].synchronize()  # sync: only when 4 batches' chains are still queued
            self._in_flight.popleft()
        return views

    def release(self) -> None:
        """Before the pipeline is rebuilt: wait for the chains still reading the old pipeline's buffers."""
        while self._in_flight:
            self._in_flight.popleft()[1].synchronize()


class CpuViews:
    """CPU, on `threads` worker threads (module docstring). images: the array source's (N, H, W, 3) uint8 tensor, or
    None for encoded files (DALI decodes them); channels 1 for gray input (one plane resized), else 3; chains: both
    views' ChainSpec."""

    outputs = CPU_OUTPUTS

    def __init__(self, images: torch.Tensor | None, size: int, channels: int, chains: tuple[ChainSpec, ChainSpec],
                 threads: int):
        self.images, self.size, self.channels, self.chains, self.threads = images, size, channels, chains, threads

    def rows(self, out: dict) -> list[torch.Tensor]:
        """The batch's (H_i, W_i, 3) uint8 images: array rows by the index DALI's source emitted (views, no copy),
        or DALI's decoded files."""
        if self.images is not None:
            index = _torch(out["pixels"]).reshape(-1)  # (B,) int64
            return [self.images[k] for k in index.tolist()]
        return [torch.from_dlpack(out["pixels"][i]) for i in range(len(out["pixels"]))]

    def crops(self, out: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([crops (B, 3, S, S) uint8 per view], [params (B, N_PARAMS) float32 per view]): torch's crops of DALI's
        windows ((B, 5) int32 [y, x, h, w, flip] per view)."""
        rows = self.rows(out)
        windows = [_torch(out[f"window{v}"]) for v in (1, 2)]
        return crop_resize_flip_many([(rows, w) for w in windows], self.size, self.channels, self.threads), \
            _params(out)

    def chain(self, crops: list[torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # both views' chunks share the workers (measured the same or better than one view after the other; making
        # each chunk's crops inside the chunk measured worse)
        return tuple(photometric_many([(crops[v], params[v], self.chains[v]) for v in (0, 1)], self.threads))

    def __call__(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chain(*self.crops(dict(zip(self.outputs, outputs))))

    def release(self) -> None:
        pass


class ProcessViews:
    """CPU arrays in `workers` forked processes (fastbyol.augment.cpu_workers.ChainProcesses), forked when this is
    built, before the DALI pipeline starts its threads (`workers`). submit(outputs, slot) hands a batch to the
    workers, collect(slot) returns its views. As CpuViews, crops(out) and chain(crops, params) compute one batch in this
    process (the workers' rows are computed exactly so: tests/test_cpu_workers.py)."""

    outputs = CPU_OUTPUTS

    def __init__(self, images: torch.Tensor, size: int, channels: int, chains: tuple[ChainSpec, ChainSpec],
                 workers: int, batch_size: int):
        from .cpu_workers import ChainProcesses

        self.inline = CpuViews(images, size, channels, chains, None)
        self.workers = ChainProcesses(images, workers, batch_size, size, channels, chains)

    def crops(self, out: dict):
        return self.inline.crops(out)

    def chain(self, crops, params):
        return self.inline.chain(crops, params)

    def submit(self, outputs, slot: int) -> None:
        out = dict(zip(self.outputs, outputs))
        windows = [_torch(out[f"window{v}"]) for v in (1, 2)]  # (B, 5) int32 each
        self.workers.submit(slot, _torch(out["pixels"]).reshape(-1), windows, _params(out))

    def collect(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.workers.collect(slot)

    def drain(self) -> None:
        """Drop the batches submitted and not collected (the workers are then idle)."""
        self.workers.drain()

    def release(self) -> None:
        pass
