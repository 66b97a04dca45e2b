"""Structural checks of encoded images, cheap enough for every file of ImageNet, strict enough that DALI never meets a
file its decoder cannot parse.

Why structural: DALI 2.4's CPU image decoder parses the headers of a batch on its thread pool when the batch holds
more than 4 x (threads + 1) samples; a header it cannot parse on a worker thread loses the error and the decode
then runs on the unparsed sample: SIGSEGV (reproduced: a file of FF D8 FF E0 + 2,000 random bytes + FF D9 among
good JPEGs crashes every run when it lands in a worker's block, and raises cleanly when it lands in the calling
thread's block or in a batch of <= 4 x (threads + 1)). So every file is walked here first, and one that would not
parse is named (or skipped under --skip-bad-files) before any DALI pipeline sees it.

- JPEG: SOI, then every marker segment up to the first SOS: each starts with FF, has a length >= 2 that stays
  inside the file; Huffman tables (DHT: at most 256 codes each) and quantization tables (DQT) exactly fill their
  segments; a frame header (SOF) with width, height > 0, 1 or 3 components with sampling factors 1-4, 8-bit
  precision, comes before the SOS, whose length matches its component count and whose components and Huffman
  tables exist; the FF D9 end marker lies in the last 1 KB. Reads the header segments (usually < 1 KB; EXIF/ICC
  segments are skipped by their length) and the tail. Only baseline, extended and progressive Huffman frames (SOF0-2)
  of 8-bit, 1- or 3-component images are accepted: the other frame types decode to garbage or crash.
- PNG: the signature, IHDR first (width, height in 1..65536, a colour type / bit depth pair the PNG specification
  allows, compression 0, filter 0, interlace 0 or 1; a PLTE before the data of a palette image), every chunk's length
  inside the file and its CRC-32 right, an IDAT, IEND last. Reads the whole file (PNG datasets are small; the CRCs catch
  corruption inside, which libpng would otherwise report in dozens of lines).
Entropy-coded data is not decoded: a JPEG whose scan data is damaged passes, and DALI reports it per sample
(a decode status, not a crash: tests/test_data_decode.py).

Unproven: a file that passes but whose safety the headers cannot show is flagged in `info["unproven"]` (the reason),
and the manifest (or the shard index) has it decoded once, before training, in a child process (unproven.py):
- an image of more than MAX_PROVEN_PIXELS pixels (the header alone says what the decoder allocates, not whether the
  machine holds it: a 60 KB JPEG may declare 65535 x 65535, 12.9 GB of pixels);
- a JPEG without any Huffman table segment before its scan (Motion-JPEG frames: the decoder's default tables are
  used, and whether the scan's codes fit them is not checked here).
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEAD = 4096  # bytes read first: the SOI and the usual header segments
_TAIL = 1024  # the end marker must lie in the last KB (encoders may pad after it)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG and DAC are not)
_MAX_SEGMENTS = 4096
_PARSED = _SOF | {0xC4, 0xDB}  # segments whose contents are checked (read whole)
# Frame types DALI's decoders (libjpeg-turbo on the CPU, nvJPEG on the GPU) read correctly: baseline, extended and
# progressive Huffman. Lossless (C3), hierarchical (C5-C7) and arithmetic-coded (C9-CB, CD-CF) frames decode to
# garbage or not at all.
_DECODABLE_SOF = frozenset({0xC0, 0xC1, 0xC2})
# Colour type -> the bit depths the PNG specification allows with it (anything else crashes libpng readers).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
MAX_SIDE = 1 << 16  # wider or taller than any decoder here allocates for (libjpeg's own limit is 65500)
MAX_PROVEN_PIXELS = 1 << 26  # 67 MP (201 MB decoded): larger images are decoded once before training (unproven)
MAX_IMAGE_BYTES = 1 << 30  # an encoded image file (or tar member) of more than 1 GiB is refused before it is read

Reader = Callable[[int, int], bytes]  # read(offset, n): up to n bytes of the object from offset


def _jpeg_problem(read: Reader, size: int, head: bytes, info: dict | None = None) -> str | None:
    # A window of the file: buf holds bytes [base, limit); refilled from `read` when a segment leaves it. This walk
    # runs once per file of a dataset (1.28M for ImageNet): lengths are kept in locals, not recomputed.
    buf, base, limit = head, 0, len(head)
    pos, sof = 2, False
    components: set[int] = set()  # component ids of the frame
    tables: set[int] = set()  # Huffman tables defined so far: (class << 4) | id
    sequential = False
    for _ in range(_MAX_SEGMENTS):
        if pos + 10 > limit:  # the next marker, its length and a frame header's fields
            buf, base = read(pos, _HEAD), pos
            limit = pos + len(buf)
            if limit - pos < 4:
                return "truncated JPEG (header runs past the end)"
        i = pos - base
        if buf[i] != 0xFF:
            return f"corrupt JPEG (no marker at byte {pos})"
        marker = buf[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            pos += 2
            continue
        if marker == 0x00 or marker == 0xD8 or marker == 0xD9:
            return f"corrupt JPEG (marker FF {marker:02X} at byte {pos} before the image data)"
        length = (buf[i + 2] << 8) | buf[i + 3]
        end = pos + 2 + length
        if length < 2:
            return f"corrupt JPEG (segment FF {marker:02X} at byte {pos} has length {length})"
        if end > size:
            return f"truncated JPEG (segment FF {marker:02X} at byte {pos} runs past the end)"
        if marker not in _PARSED and marker != 0xDA:
            pos = end  # APPn, COM, DRI, ...: skipped by their length
            continue
        if end > limit:  # the whole segment in the window
            buf, base = read(pos, max(_HEAD, end - pos)), pos
            limit, i = pos + len(buf), 0
            if limit < end:
                return f"truncated JPEG (segment FF {marker:02X} at byte {pos} runs past the end)"
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return _jpeg_scan(read, size, head, (buf, i, pos, end, length), (sof, sequential, components, tables),
                              info)
        if marker == 0xC4:  # DHT: tables of 1 + 16 + sum(counts) bytes that exactly fill the segment
            body = buf[i + 4:i + 2 + length]
            ids = _HUFFMAN_SEEN.get(body)  # most encoders write the same standard tables into every file
            if ids is None:
                ids = _huffman_tables(body)
                if isinstance(ids, int):
                    return f"corrupt JPEG (Huffman table at byte {pos + 4 + ids})"
                if len(_HUFFMAN_SEEN) >= 4096:
                    _HUFFMAN_SEEN.clear()
                _HUFFMAN_SEEN[body] = ids
            tables.update(ids)
        elif marker == 0xDB:  # DQT: tables of 65 (8-bit) or 129 (16-bit) bytes that exactly fill the segment
            j, stop = i + 4, i + 2 + length
            while j < stop:
                t = buf[j]
                if t > 0x1F or t & 0x0C:  # precision 0 or 1, table id 0..3
                    break
                j += 129 if t >> 4 else 65
            if j != stop:
                return f"corrupt JPEG (quantization table at byte {pos})"
        else:  # a frame header (SOF)
            if marker not in _DECODABLE_SOF:
                return f"unsupported JPEG (frame type FF {marker:02X}: only baseline, extended and progressive " \
                       "Huffman-coded JPEGs are read)"
            if sof:
                return "corrupt JPEG (a second frame header)"
            if length < 8:  # its fields would be read past the segment (and past the file's end)
                return f"corrupt JPEG (frame header at byte {pos} has length {length})"
            precision, height, width, ncomp = struct.unpack_from(">BHHB", buf, i + 4)
            if precision != 8 or ncomp not in (1, 3):
                return f"unsupported JPEG (frame header: {ncomp} components, {precision} bits; only 8-bit grey " \
                       "or colour is read)"
            if height > MAX_SIDE or height == 0 or width == 0 or length != 8 + 3 * ncomp:
                return f"corrupt JPEG (frame header: {width}x{height}, {ncomp} components, {precision} bits)"
            for k in range(i + 10, i + 10 + 3 * ncomp, 3):  # sampling factors 1..4 each
                hv = buf[k + 1]
                if not (0x11 <= hv <= 0x44 and 1 <= hv & 15 <= 4):
                    return "corrupt JPEG (frame header: bad sampling factors)"
                components.add(buf[k])
            sof, sequential = True, marker != 0xC2
            if info is not None:
                info["gray"] = ncomp == 1  # decoded as RGB, one channel gives R = G = B
                if width * height > MAX_PROVEN_PIXELS:
                    info["unproven"] = f"{width}x{height} pixels"
        pos = end
    return "corrupt JPEG (too many header segments)"


_HUFFMAN_SEEN: dict[bytes, tuple[int, ...]] = {}  # DHT bodies already parsed -> their table ids (at most 4,096)


def _huffman_tables(body: bytes) -> tuple[int, ...] | int:
    """The table ids ((class << 4) | id) of a DHT segment's body, tables of 1 + 16 + sum(counts) bytes that exactly
    fill it; or the offset in the body of the first table that is not one."""
    ids, j, stop = [], 0, len(body)
    while j < stop:
        total = sum(body[j + 1:j + 17])
        if body[j] & 0xEC or total > 256 or j + 17 + total > stop:
            return j
        ids.append(body[j])
        j += 17 + total
    return tuple(ids)


def _jpeg_scan(read: Reader, size: int, head: bytes, segment: tuple, frame: tuple, info: dict | None) -> str | None:
    """The start-of-scan segment and what follows it: its components and Huffman tables must be the frame's, image
    data must follow, and the end-of-image marker lie in the last KB. segment: (buf, i, pos, end, length), the
    segment at buf[i], byte `pos` of the file; frame: (sof seen, sequential, component ids, Huffman table ids)."""
    buf, i, pos, end, length = segment
    sof, sequential, components, tables = frame
    ns = buf[i + 4] if len(buf) > i + 4 else 0
    if not sof:
        return "corrupt JPEG (image data before any frame header)"
    if not 1 <= ns <= 4 or length != 6 + 2 * ns:
        return f"corrupt JPEG (scan header at byte {pos})"
    for k in range(i + 5, i + 5 + 2 * ns, 2):  # each scan component is a frame component with defined tables
        cid, sel = buf[k], buf[k + 1]
        if cid not in components:
            return f"corrupt JPEG (scan names component {cid}, which the frame does not have)"
        if tables and ((sel >> 4) not in tables or sequential and (0x10 | sel & 15) not in tables):
            return f"corrupt JPEG (scan uses Huffman table {sel:02X}, which is not defined)"
    if end >= size - 2:
        return "truncated JPEG (no image data)"
    if not tables and info is not None:
        info.setdefault("unproven", "no Huffman tables (the decoder's defaults)")
    start = max(end, size - _TAIL)
    tail = head[start:] if size <= len(head) else read(start, size - start)
    return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"


def _png_problem(data: bytes, info: dict | None = None) -> str | None:
    pos, first, seen_idat, colour, plte = 8, True, False, -1, False
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return "truncated PNG (a chunk runs past the end)"
        if not kind.isalpha():
            return f"corrupt PNG (chunk type {kind!r} at byte {pos})"
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
            return f"corrupt PNG (CRC mismatch in chunk {kind.decode()} at byte {pos})"
        if first:
            if kind != b"IHDR" or length != 13:
                return "corrupt PNG (IHDR is not the first chunk)"
            width, height, depth, colour, method, filt, interlace = struct.unpack(">IIBBBBB", body)
            if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or depth not in _PNG_DEPTHS.get(colour, ()):
                return f"corrupt PNG (header: {width}x{height}, bit depth {depth}, colour type {colour})"
            if method != 0 or filt != 0 or interlace not in (0, 1):
                return f"corrupt PNG (header: compression {method}, filter {filt}, interlace {interlace})"
            if info is not None:
                info["gray"] = colour in (0, 4)  # grey, grey + alpha
                if width * height > MAX_PROVEN_PIXELS:
                    info["unproven"] = f"{width}x{height} pixels"
            first = False
        plte |= kind == b"PLTE"
        if kind == b"IDAT" and colour == 3 and not plte:
            return "corrupt PNG (a palette image without a PLTE chunk before its data)"
        seen_idat |= kind == b"IDAT"
        if kind == b"IEND":
            return None if seen_idat else "corrupt PNG (no image data)"
        pos = end
    return "truncated PNG (no IEND chunk)"


def check_encoded(read: Reader, size: int, suffix: str = "", info: dict | None = None) -> str | None:
    """None if the object (read through `read`, `size` bytes) is a structurally whole JPEG or PNG, else why not.

    info: a dict that receives "gray" (True when the image is stored with one grey channel) and, for a file that
    passes but that the headers cannot prove safe, "unproven" (why; see the module's docstring)."""
    if size < 16:
        return f"{size} bytes: too short to be an image"
    if size > MAX_IMAGE_BYTES:  # read whole by the PNG check, the kNN decode and DALI
        return f"{size} bytes: larger than any image fastbyol reads (at most {MAX_IMAGE_BYTES})"
    head = read(0, min(size, _HEAD))
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg_problem(read, size, head, info)
    if head[:8] == PNG_SIGNATURE:
        return _png_problem(head if size <= len(head) else head + read(len(head), size - len(head)), info)
    suffix = suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return f"not a {suffix[1:].upper()} file (bad signature)"
    return "not an image file (only JPEG and PNG are read)"


def check_bytes(data: bytes, suffix: str = "", info: dict | None = None) -> str | None:
    """check_encoded on bytes in memory."""
    return check_encoded(lambda off, n: data[off:off + n], len(data), suffix, info)


def check_fd(fd: int, size: int, suffix: str = "", base: int = 0, info: dict | None = None) -> str | None:
    """check_encoded on an open file: the whole file (base 0) or a member of `size` bytes at `base` (a tar)."""
    return check_encoded(lambda off, n: os.pread(fd, max(0, min(n, size - off)), base + off), size, suffix, info)


def open_regular(path, dir_fd: int | None = None) -> int:
    """An fd of `path` opened for reading without blocking (a FIFO or a device never stalls the checks), after
    which fstat says it is a regular file; NotRegularFile (an OSError, strerror "not a regular file") otherwise."""
    return open_regular_stat(path, dir_fd)[0]


def open_regular_stat(path, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """open_regular's fd and the fstat it took (its size, times and inode: the file's identity when opened)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0), dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(0, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def range_reader(path: str, offset: int, size: int) -> Callable[[], bytes]:
    """read() -> the `size` bytes at `offset` of the regular file `path` (a tar shard's member), opened per call."""

    def read() -> bytes:
        fd = open_regular(path)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    return read


class NotRegularFile(OSError):
    """A data path that names a FIFO, a device, a socket or a folder: never read."""


def check_image_file(path: Path) -> str | None:
    """None if the file is a structurally whole JPEG or PNG, else the reason it is not."""
    try:
        fd = open_regular(path)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    try:
        return check_fd(fd, os.fstat(fd).st_size, Path(path).suffix)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    finally:
        os.close(fd)
