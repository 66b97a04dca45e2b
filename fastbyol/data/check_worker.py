"""Subprocesses of the manifest scan and of the shard index: each works on its own core, and dies with its parent
(fastbyol.system.children).

    python -m fastbyol.data.check_worker ROOT THREADS  < relative paths ("\\n"-separated)
        checks its share of a folder's files (manifest.check_files); writes N (int64), N identities (N x 4 int64:
        size, mtime, inode, ctime; little-endian), N grey flags (uint8) and the problems and the unproven files (JSON
        [[[index, reason], ...], [[index, why unproven], ...]]) to stdout.
    python -m fastbyol.data.check_worker --shards FOLDER  < shard paths ("\\n"-separated)
        indexes the shards into FOLDER (shards.build_shard_metas); a FastByolError's message goes to stdout (exit 2).
    python -m fastbyol.data.check_worker --verify MANIFEST_FOLDER
        prints the relative paths (JSON list) of the files whose identity differs from the manifest's.
    python -m fastbyol.data.check_worker --manifest ROOT TOKEN
        builds or checks the image folder's manifest (manifest.obtain), while the process that started it loads torch
        (manifest.start_prescan); silent, exit 0 or 1.
    python -m fastbyol.data.check_worker --decode  < JSON [[path, offset, size, name], ...]
        decodes each whole file (offset -1) or tar member (size bytes at offset) (unproven.child_main): one JSON line
        [index, reason or null] per item.
"""

import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> int:
    from ..system.children import die_with_parent

    die_with_parent()  # the parent's work only: a SIGKILLed parent takes its children along
    if argv[0] == "--manifest":
        from .manifest import obtain

        try:
            obtain(Path(argv[1]), built_for=argv[2])
        except BaseException:  # noqa: BLE001 (the trainer meets the same problem and says it in one line)
            return 1
        return 0
    if argv[0] == "--verify":
        from .manifest import Manifest

        man = Manifest.load(Path(argv[1]))
        changed = man.changed_files(man.root)
        sys.stdout.write(json.dumps([man.path(i) for i in changed]))
        return 0
    if argv[0] == "--decode":
        from .unproven import child_main

        return child_main(json.loads(sys.stdin.buffer.read()))
    if argv[0] == "--shards":
        from ..errors import FastByolError
        from .shards import build_shard_metas

        lines = sys.stdin.buffer.read().decode("utf-8", "surrogateescape").splitlines()
        try:
            build_shard_metas([Path(line) for line in lines if line], Path(argv[1]))
        except FastByolError as e:  # the parent's one line (a pre-flight decode that could not run)
            sys.stdout.write(str(e))
            return 2
        return 0
    from .manifest import blob_strings, path_bytes, check_files

    rels = blob_strings(np.frombuffer(sys.stdin.buffer.read(), dtype=np.uint8))
    checked = check_files(argv[0], rels, int(argv[1]))
    out = sys.stdout.buffer
    out.write(np.int64(len(checked.gray)).tobytes())
    out.write(checked.ids.astype("<i8").tobytes())
    out.write(checked.gray.astype(np.uint8).tobytes())
    out.write(path_bytes(json.dumps([checked.problems, checked.unproven])))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
