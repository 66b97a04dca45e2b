"""A subprocess of the manifest scan: checks its share of the files (manifest.check_files) on its own core.

    python -m fastbyol.data.check_worker ROOT THREADS  < relative paths ("\\n"-separated)
writes N (int64), N sizes, N mtimes (int64, little-endian) and the problems (JSON [[index, reason], ...]) to stdout.
"""

import json
import sys

import numpy as np

from .manifest import _strings, _utf8, check_files


def main(root: str, threads: int) -> int:
    rels = _strings(np.frombuffer(sys.stdin.buffer.read(), dtype=np.uint8))
    sizes, mtimes, problems = check_files(root, rels, threads)
    out = sys.stdout.buffer
    out.write(np.int64(len(sizes)).tobytes())
    out.write(sizes.astype("<i8").tobytes())
    out.write(mtimes.astype("<i8").tobytes())
    out.write(_utf8(json.dumps(problems)))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
