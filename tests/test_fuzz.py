"""Fuzz harness (Hypothesis): mutated image headers (PNG IHDR, JPEG SOF), checkpoint fields and run files
(config.json, metrics.jsonl) end in one FastByolError line, or pass as inputs that are really valid; never another
exception. Each property runs a few examples here (bounded for `make test`) and many more in its `slow` twin.

    pytest tests/test_fuzz.py -m "not slow"     # the quick profile
    pytest tests/test_fuzz.py -m slow           # the long one
"""

import io
import json
import shutil
import struct
import zlib

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastbyol.run.checkpoint import CHECKPOINT, check_checkpoint_tensors, load_run  # noqa: E402
from fastbyol.config import Config  # noqa: E402
from fastbyol.data.checks import check_bytes  # noqa: E402
from fastbyol.errors import FastByolError  # noqa: E402
from fastbyol.run.state import TrainState  # noqa: E402

from .support import one_step_run  # noqa: E402

QUICK = settings(max_examples=20, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
LONG = settings(max_examples=1000, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _one_line(e: FastByolError) -> None:
    assert str(e).strip() and "\n" not in str(e).strip(), str(e)


# ------------------------------------------------------------------------------------------------------------ images
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width, height, depth, colour, compression, filter_, interlace) -> bytes:
    """An RGB 4x3 image's pixels under an IHDR that says these fields (CRC right: the fields are what is tested)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, compression, filter_, interlace)
    raw = b"".join(b"\0" + bytes(range(12)) for _ in range(3))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


ihdr_fields = st.tuples(st.sampled_from([0, 1, 4, 65536, 65537, 2**31]), st.sampled_from([0, 3, 65536, 70000]),
                        st.integers(0, 20), st.integers(0, 8), st.integers(0, 2), st.integers(0, 2), st.integers(0, 3))


def _png_property(fields) -> None:
    width, height, depth, colour, compression, filter_, interlace = fields
    problem = check_bytes(_png(*fields), ".png")
    spec_ok = (1 <= width <= 65536 and 1 <= height <= 65536 and depth in PNG_DEPTHS.get(colour, ())
               and colour != 3  # a palette image needs a PLTE chunk, which this file has not
               and compression == 0 and filter_ == 0 and interlace in (0, 1))
    if problem is None:
        assert spec_ok, fields  # the check passes only what the PNG specification allows
    else:
        assert isinstance(problem, str) and "\n" not in problem


@QUICK
@given(ihdr_fields)
def test_png_ihdr_mutations(fields):
    _png_property(fields)


@pytest.mark.slow
@LONG
@given(ihdr_fields)
def test_png_ihdr_mutations_long(fields):
    _png_property(fields)


@pytest.fixture(scope="module")
def jpeg_bytes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 90)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _sof_offset(data: bytes) -> int:
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return pos


sof_fields = st.tuples(st.integers(0xC0, 0xCF), st.sampled_from([8, 12, 16, 0]), st.integers(0, 5),
                       st.integers(0, 0xFF))


def _jpeg_property(data: bytes, fields) -> None:
    marker, precision, ncomp, sampling = fields
    pos = _sof_offset(data)
    blob = bytearray(data)
    blob[pos + 1] = marker
    blob[pos + 4] = precision
    if ncomp != blob[pos + 9]:  # the count byte only: the segment's length then disagrees unless it is 3 again
        blob[pos + 9] = ncomp
    blob[pos + 11] = sampling  # the first component's sampling factors (H << 4 | V)
    problem = check_bytes(bytes(blob), ".jpg")
    if problem is None:
        assert marker in (0xC0, 0xC1, 0xC2) and precision == 8 and ncomp == 3, fields
        assert 1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4, fields
    else:
        assert isinstance(problem, str) and "\n" not in problem


@QUICK
@given(fields=sof_fields)
def test_jpeg_sof_mutations(jpeg_bytes, fields):
    _jpeg_property(jpeg_bytes, fields)


@pytest.mark.slow
@LONG
@given(fields=sof_fields)
def test_jpeg_sof_mutations_long(jpeg_bytes, fields):
    _jpeg_property(jpeg_bytes, fields)


@QUICK
@given(st.data())
def test_random_header_bytes_never_raise(jpeg_bytes, data):
    blob = bytearray(jpeg_bytes if data.draw(st.booleans()) else _png(4, 3, 8, 2, 0, 0, 0))
    for _ in range(data.draw(st.integers(1, 6))):
        blob[data.draw(st.integers(0, min(len(blob), 300) - 1))] = data.draw(st.integers(0, 255))
    problem = check_bytes(bytes(blob), "")
    assert problem is None or (isinstance(problem, str) and "\n" not in problem)


# ------------------------------------------------------------------------------------------------------ checkpoints
anything = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                     st.builds(lambda n: torch.zeros(n, dtype=torch.uint8), st.integers(0, 6000)))
state_fields = st.dictionaries(st.sampled_from(["step", "world_size", "num_images", "knn_top1_random_init",
                                                "data_states", "torch_rngs", "meter", "peak_device_bytes",
                                                "finished", "unknown"]), anything, min_size=1, max_size=3)


def _state_property(changes: dict) -> None:
    raw = {"step": 1, "world_size": 1, "num_images": 300, "torch_rngs": [torch.get_rng_state()], **changes}
    try:
        state = TrainState.from_checkpoint({"format": 2, "model": {}, "state": raw}, "RUN/checkpoint.pt")
    except FastByolError as e:
        _one_line(e)
        return
    assert state.checked() is state and state.step >= 0 and state.world_size >= 1  # what passed is valid


@QUICK
@given(state_fields)
@example({"step": torch.zeros(18, dtype=torch.uint8)})  # found by the long profile: a tensor's repr spans lines
@example({"data_states": ["x" * 10_000]})
def test_checkpoint_state_fields(changes):
    _state_property(changes)


@pytest.mark.slow
@LONG
@given(state_fields)
def test_checkpoint_state_fields_long(changes):
    _state_property(changes)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = one_step_run(tmp_path_factory.mktemp("fuzz") / "run")
    return run, *load_run(run)


tensor_edits = st.lists(st.tuples(st.integers(0, 200), st.sampled_from(["drop", "shape", "dtype", "type", "same"])),
                        min_size=1, max_size=3)


@QUICK
@given(edits=tensor_edits)
def test_checkpoint_model_tensors(good_run, edits):
    _, cfg, _, ckpt = good_run
    model = dict(ckpt["model"])
    names = sorted(model)
    changed = False
    for index, kind in edits:
        name = names[index % len(names)]
        if not isinstance(model.get(name), torch.Tensor):  # dropped or no longer a tensor by an earlier edit
            continue
        if kind == "drop":
            del model[name]
        elif kind == "shape":
            model[name] = torch.zeros(model[name].numel() + 1)
        elif kind == "dtype":
            model[name] = model[name].to(torch.float16 if model[name].is_floating_point() else torch.float32)
        elif kind == "type":
            model[name] = model[name].tolist()
        changed |= kind != "same"
    try:
        check_checkpoint_tensors({**ckpt, "model": model}, cfg, "RUN/checkpoint.pt")
    except FastByolError as e:
        _one_line(e)
        assert changed
        return
    assert not changed


# -------------------------------------------------------------------------------------------------------- run files
config_edits = st.lists(st.tuples(st.sampled_from(["preset", "data", "model", "optim", "run", "resolved"]),
                                  st.sampled_from(["image_size", "batch_size", "arch", "proj_hidden", "epochs",
                                                   "base_lr", "seed", "device", "nonsense", None]), anything),
                        min_size=1, max_size=3)


@QUICK
@given(edits=config_edits)
def test_config_json_mutations(good_run, edits):
    _, cfg, _, _ = good_run
    raw = json.loads(json.dumps(cfg.to_dict()))
    for section, key, value in edits:
        value = value.tolist() if isinstance(value, torch.Tensor) else value
        if key is None or not isinstance(raw.get(section), dict):
            raw[section] = value
        else:
            raw[section][key] = value
    try:
        loaded = Config.from_dict(raw, where="RUN/config.json")
        loaded.validate()
    except FastByolError as e:
        _one_line(e)
        return
    assert Config.from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()  # what loads is a valid config


metrics_lines = st.lists(st.one_of(st.text(max_size=20), st.builds(json.dumps, st.one_of(
    st.lists(st.integers(), max_size=2), st.integers(), st.dictionaries(st.sampled_from(["step", "loss", "lr", "tau",
                                                                                        "img_per_s", "knn_top1"]),
                                                                       st.one_of(st.integers(-5, 5), st.floats(),
                                                                                 st.text(max_size=3)))))),
                         min_size=1, max_size=4)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=metrics_lines)
def test_metrics_jsonl_mutations_plot(good_run, tmp_path_factory, lines):
    from fastbyol.evaluation.export import plot_run

    run = tmp_path_factory.mktemp("plot") / "run"
    shutil.copytree(good_run[0], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    try:
        out = plot_run(run)
    except FastByolError as e:
        _one_line(e)
        return
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / CHECKPOINT).is_file()
