"""A checkpoint's training state is untrusted input: each field is checked for its type and range before anything is
restored from it, and a damaged one is one FastByolError naming the field (never a traceback, never a run that
trains on with a negative step or a wrong RNG state)."""

from pathlib import Path

import pytest
import torch

from fastbyol.errors import FastByolError
from fastbyol.run.state import TrainState


def _good() -> dict:
    return dict(step=12, world_size=2, num_images=640, knn_top1_random_init=41.5, data_states=["a", b"b"],
                torch_rngs=[torch.get_rng_state(), torch.get_rng_state()],
                meter={"steps": 10, "seconds": 1.5, "wait_seconds": 0.1, "warmup_seconds": 3.0},
                peak_device_bytes=0.0, finished=False)


def _load(**changes) -> TrainState:
    return TrainState.from_checkpoint({"format": 2, "model": {}, "state": {**_good(), **changes}}, "RUN/checkpoint.pt")


def test_a_whole_state_loads():
    state = _load()
    assert state.step == 12 and state.world_size == 2 and len(state.torch_rngs) == 2


@pytest.mark.parametrize("field, value", [
    ("step", -5), ("step", 1.5), ("step", "3"), ("step", True), ("world_size", 0), ("num_images", -1),
    ("knn_top1_random_init", 250.0), ("knn_top1_random_init", "x"),
    ("data_states", "abc"), ("data_states", [1, 2]), ("data_states", ["only one"]),
    ("torch_rngs", torch.get_rng_state()), ("torch_rngs", [torch.zeros(5, dtype=torch.uint8)] * 2),
    ("torch_rngs", [torch.get_rng_state().float()] * 2), ("torch_rngs", [[1, 2], [3]]),
    ("meter", [1, 2]), ("meter", {"steps": 1}), ("meter", {"steps": -1, "seconds": 0, "wait_seconds": 0,
                                                           "warmup_seconds": 0}),
    ("peak_device_bytes", -1.0), ("finished", "yes"),
])
def test_a_damaged_field_is_one_line_naming_it(field, value):
    with pytest.raises(FastByolError) as e:
        _load(**{field: value})
    message = str(e.value)
    assert field in message and "RUN/checkpoint.pt" in message and "\n" not in message


@pytest.mark.parametrize("ckpt, needle", [
    ({"model": {}, "step": 5, "world_size": 1, "data_states": [], "torch_rngs": []}, "no checkpoint format number"),
    ({"format": 1, "model": {}, "step": 5}, "checkpoint format 1 is not one this fastbyol reads"),
    ({"format": "2", "model": {}, "state": {}}, "no checkpoint format number"),
    ({"format": 3, "model": {}, "state": {}}, "checkpoint format 3 is not one"),
])
def test_a_checkpoint_of_another_layout_is_one_line(ckpt, needle):
    """An older layout (the state's fields at the top level, no format number) or another format number: refused
    in one line naming the file, as any foreign file is."""
    with pytest.raises(FastByolError) as e:
        TrainState.from_checkpoint(ckpt, "old.pt")
    assert needle in str(e.value) and "old.pt" in str(e.value) and "\n" not in str(e.value)


def test_a_step_past_the_schedule_is_refused():
    state = _load(world_size=1, data_states=["a"], torch_rngs=[torch.get_rng_state()])
    state.check_resumable("RUN", 1, 640, total_steps=12)  # at the end exactly: fine
    with pytest.raises(FastByolError, match="past the run's 11 steps"):
        state.check_resumable("RUN", 1, 640, total_steps=11)


@pytest.mark.parametrize("name", ["ckpt-format-empty-tensor.pt", "ckpt-format1-config-list.pt"])
def test_fuzz_found_checkpoints_are_one_error(name):
    """Two checkpoints a fuzzer found: a `format` that is a tensor (its `==` raised RuntimeError) and an older layout
    whose `config` is a list (AttributeError): each is one FastByolError naming the file."""
    path = Path(__file__).parent / "corpus" / name
    ckpt = torch.load(path, weights_only=True)
    with pytest.raises(FastByolError) as e:
        TrainState.from_checkpoint(ckpt, where=str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
