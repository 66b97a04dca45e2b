"""Reader for the idx format of MNIST and Fashion-MNIST (plain or gzip), written here: no torchvision.

Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions n, then n big-endian uint32 sizes,
then the data, row-major. Every malformed file raises FastByolError naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import FastByolError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
           0x0E: np.dtype(">f8")}


def _read_header(f, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
        raise FastByolError(f"not an idx file (bad magic number): {path}")
    ndim = magic[3]
    dims = f.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise FastByolError(f"truncated idx header in {path}")
    return np.dtype(_DTYPES[magic[2]]), struct.unpack(f">{ndim}I", dims)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one idx file; `.gz` files are decompressed. What the header declares is bounded before it
    is read: a plain file must hold exactly that many bytes, and a .gz (which may expand to any size) may declare no
    more than half of the machine's memory and must then hold exactly that."""
    from ..system.bounds import host_memory_bytes

    path = Path(path)
    if not path.is_file():
        raise FastByolError(f"idx file not found: {path}")
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            dtype, shape = _read_header(f, path)
            expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
            stored = None if path.suffix == ".gz" else path.stat().st_size - 4 - 4 * len(shape)
            if stored is not None and stored != expected:
                raise FastByolError(f"idx file {path} holds {stored} data bytes but its header {shape} says {expected}")
            if expected > host_memory_bytes() // 2:
                raise FastByolError(f"idx file {path}: its header {shape} declares {expected} bytes, more than half "
                                    "of this machine's memory")
            raw = f.read(expected + 1)  # one byte more: a file longer than its header says is refused
    except (OSError, EOFError, zlib.error) as e:  # gzip: BadGzipFile (an OSError), EOFError when truncated
        raise FastByolError(f"cannot read idx file {path}: {e}") from None
    if len(raw) != expected:
        held = len(raw) if len(raw) <= expected else f"more than {expected}"
        raise FastByolError(f"idx file {path} holds {held} data bytes but its header {shape} says {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
