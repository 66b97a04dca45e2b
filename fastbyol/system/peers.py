"""Bounded waits across the ranks of a torchrun job, and one line for every way a peer can be lost.

Every wait on another rank ends: in a correct run, or on every surviving rank in one line within `--dist-timeout`
seconds of the peer's last sign of life. Never a hang, never a gloo or NCCL traceback.

- The rendezvous (`init_process_group` and torchrun's agent store) and every collective of the process groups
  (the step's gradients and BN statistics, the bookkeeping's objects, the stop check) run with the timeout: a peer
  that never starts, or stops answering inside a collective, ends the wait after `--dist-timeout`. A peer that
  dies closes its sockets, and gloo fails its peers' next collective at once.
- Waits for one rank's long work (rank 0 building a dataset's manifest or index, or computing the kNN monitor,
  while the others wait) are not collectives: `Peers.barrier` counts arrivals in the job's store and watches the
  ranks that have not arrived, each of which beats a counter in the store every BEAT_S from a thread of its own.
  A peer that is working keeps beating, however long its work takes; one that died, or whose host is gone, stops
  beating, and the wait ends after `--dist-timeout` without a beat. A rank that stops with an error posts its line
  first (`Peers.stop`): the others end at once, naming it.
- `lost_peer(e, ...)` turns what torch raises for a lost peer (DistError, gloo's "Connection closed by peer",
  a timeout, NCCL's errors) into one FastByolError line naming the rank and, when the peer posted one, its reason.
"""

from __future__ import annotations

import re
import threading
import time

from ..errors import FastByolError

BEAT_S = 1.0  # seconds between two beats of a rank's heartbeat (at most a quarter of the timeout)
POLL_S = 0.05  # seconds between two looks at the store while a barrier waits
_KEY = "fastbyol/peers"


class PeerLost(FastByolError):
    """Another rank stopped, or stopped answering: this one stops too (one line)."""


class Peers:
    """This process's view of the other ranks: the job's store, its own heartbeat, the barrier count and the
    timeout. `group` is the process group of the bookkeeping collectives (gloo: host memory, no device sync)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, group=None):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.group = group
        self.barriers = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ the heartbeat
    def start(self) -> Peers:
        """Beat from a daemon thread until `stop` (or the store goes: then silently)."""
        beat_s = min(BEAT_S, self.timeout_s / 4)

        def beat() -> None:
            while True:
                try:
                    self.store.add(f"{_KEY}/beat/{self.rank}", 1)
                except Exception:  # noqa: BLE001 (the store's host is gone: the waits say so, not this thread)
                    return
                if self._stop.wait(beat_s):
                    return

        self._thread = threading.Thread(target=beat, name="fastbyol-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self, error: BaseException | None = None) -> None:
        """Stop beating; with `error` (this rank stops on it), post its line first, for the ranks waiting on it."""
        if error is not None and not isinstance(error, PeerLost):
            line = first_line(error) if str(error).strip() else type(error).__name__
            try:
                self.store.set(f"{_KEY}/gone/{self.rank}", line)
                self.store.add(f"{_KEY}/gone", 1)  # one counter the waiting ranks read, not one key per rank
            except Exception:  # noqa: BLE001 (no store left to tell)
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * BEAT_S)
            self._thread = None

    # ---------------------------------------------------------------------------------------------- what peers say
    def news(self) -> str | None:
        """'rank R stopped: LINE' for the first rank that posted why it stopped, else None (also without a store)."""
        try:
            if self.store.add(f"{_KEY}/gone", 0) == 0:
                return None
            for r in range(self.world_size):
                if r != self.rank and self.store.check([f"{_KEY}/gone/{r}"]):
                    return f"rank {r} stopped: {self.store.get(f'{_KEY}/gone/{r}').decode(errors='replace')}"
        except Exception:  # noqa: BLE001
            return None
        return None

    def beats(self) -> list[int]:
        """Every rank's heartbeat count (one store request once every rank has beaten; -1 for one that has not)."""
        keys = [f"{_KEY}/beat/{r}" for r in range(self.world_size)]
        if self.store.check(keys):
            return [int(v) for v in self.store.multi_get(keys)]
        return [int(self.store.add(k, 0)) if self.store.check([k]) else -1 for k in keys]

    # --------------------------------------------------------------------------------------------------- the barrier
    def barrier(self) -> None:
        """Wait until every rank gets here, however long a live rank takes; PeerLost (one line) when one posts that
        it stopped, or shows no beat for the timeout, or the store's host (rank 0 on env://) is gone. The store
        requests stay few at any world size: the arrival count and the stop counter every POLL_S, every rank's
        beat in one request every BEAT_S."""
        self.barriers += 1
        key = f"{_KEY}/barrier/{self.barriers}"
        try:
            self._wait_all(key)
        except FastByolError:
            raise
        except Exception as e:  # noqa: BLE001 (the store itself is lost: its host died)
            raise PeerLost(f"rank {self.rank}: lost the job's rendezvous store, held by rank 0 or torchrun's agent "
                           f"({first_line(e)}): the job stops") from None

    def _wait_all(self, key: str) -> None:
        arrived = self.store.add(key, 1)
        last: list[tuple[int, float]] = []  # per rank: (its last beat count, when it changed, this clock)
        looked = -BEAT_S
        while arrived < self.world_size:
            news = self.news()
            if news is not None:
                raise PeerLost(f"rank {self.rank}: {news}")
            now = time.monotonic()
            if now - looked >= BEAT_S:
                looked = now
                counts = self.beats()
                last = [(c, now) if not last or last[r][0] != c else last[r] for r, c in enumerate(counts)]
                silent = [r for r, (_, since) in enumerate(last) if r != self.rank and now - since > self.timeout_s]
                if silent:
                    raise PeerLost(f"rank {self.rank}: rank {silent[0]} gave no sign of life for {self.timeout_s:g} "
                                   "s (--dist-timeout): it died or its host is unreachable; the job stops")
            time.sleep(POLL_S)
            arrived = self.store.add(key, 0)


def first_line(e: BaseException) -> str:
    """The part of a torch or gloo message worth a line: no source location, no advice, at most 200 characters."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # "[../gloo/transport/tcp/pair.cc:553] "
    text = re.split(r"\. This (is|may be) (typically|caused)", text)[0]
    return text[:200]


# what torch says when a peer is lost, by the words of its message: (pattern, what it means)
_LOST = [
    (r"Connection closed by peer|Connection reset by peer|Broken pipe|Socket closed|remote process exited",
     "another process stopped"),
    (r"[Tt]imed? ?out|timeout", "a collective did not complete within --dist-timeout {timeout:g} s (another process "
                               "stopped answering)"),
    (r"NCCL|DistBackendError|ProcessGroup", "a collective failed"),
]


def lost_peer(e: BaseException, rank: int, timeout_s: float, peers: Peers | None = None) -> FastByolError | None:
    """One line for an exception that says another rank was lost (or a collective could not complete), naming
    the rank that stopped and why when it posted its reason; None for any other exception."""
    import torch.distributed as dist

    if isinstance(e, FastByolError):
        return None
    text = str(e)
    if "appears not to match" in text or "DDP expects same model" in text:  # DDP's own check of the parameters
        return FastByolError(f"rank {rank}: the processes built different models ({first_line(e)}): start every "
                             "process with the same settings and encoder")
    if not (isinstance(e, dist.DistError) or isinstance(e, RuntimeError) and re.search(r"gloo|NCCL|c10d|ProcessGroup",
                                                                                     text)):
        return None  # not from torch.distributed: another component's error, reported as it is
    for pattern, meaning in _LOST:
        if re.search(pattern, text):
            news = peers.news() if peers is not None else None
            why = news or meaning.format(timeout=timeout_s)
            return PeerLost(f"rank {rank}: {why} ({first_line(e)}); this process stops too")
    return None
