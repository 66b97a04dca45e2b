"""`fastbyol bench augment` prints samples/s (and one JSON object with --json, with the DALI graph's operator count);
bad options exit 2. `bench_photometric` times each backend of the photometric chain (CPU sizes here)."""

import dataclasses
import json

import pytest

from fastbyol.cli import main

pytest.importorskip("nvidia.dali")


@pytest.mark.parametrize("source", ["arrays", "jpeg"])
def test_bench_augment_json(capsys, source):
    if source == "jpeg":
        pytest.importorskip("PIL")
    assert main(["bench", "augment", "--size", "32", "--batch", "8", "--steps", "3", "--threads", "1",
                 "--source", source, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples_per_s"] > 0 and r["samples_per_s_mean"] > 0 and r["size"] == 32 and r["source"] == source
    assert 10 < r["operators"] <= 60 and r["photometric"] == "reference"


def test_bench_augment_gray_source():
    from fastbyol.tools.bench_augment import AugmentBenchSettings, bench_augment, synthetic_source

    images = synthetic_source(28, 16, "gray")
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    gray = AugmentBenchSettings(28, 8, source="gray", steps=2, warmup=1, num_threads=1)
    r = bench_augment(gray)
    assert r["samples_per_s"] > 0 and r["source"] == "gray"
    from fastbyol.augment import views_from_config
    from fastbyol.config import DEFAULT_PRESET, get_preset

    view1, _ = views_from_config(get_preset(DEFAULT_PRESET))  # what the trainer uses by default is what is measured
    assert r["blur_window"] == view1.blur_window_rule and r["blur_taps"] == view1.blur_window(28)
    assert r["crop_area"] == list(view1.crop_area) == [0.2, 1.0]  # the preset's crop_min_area, not ViewSpec's 0.08
    r = bench_augment(dataclasses.replace(gray, blur_window="official"))
    assert r["blur_window"] == "official" and r["blur_taps"] == 3


def test_bench_augment_errors(capsys):
    assert main(["bench", "augment", "--size", "2"]) == 2
    assert "--size must be >= 8" in capsys.readouterr().err


@pytest.mark.parametrize("backend, threads", [("reference", None), ("reference", 2), ("triton", None)])
def test_bench_photometric_on_the_cpu(backend, threads):
    if backend == "triton":
        pytest.importorskip("triton")
    from fastbyol.tools.bench_augment import bench_photometric

    r = bench_photometric(16, 4, "cpu", backend, steps=2, threads=threads)
    assert {"backend", "size", "batch", "device", "ms_per_batch", "images_per_s"} <= set(r)
    assert r["backend"] == backend and r["device"] == "cpu" and r["ms_per_batch"] > 0
    assert r["images_per_s"] == pytest.approx(4 / (r["ms_per_batch"] / 1000))


def test_bench_photometric_errors(monkeypatch):
    from fastbyol.tools.bench_augment import bench_photometric
    from fastbyol.errors import FastByolError

    with pytest.raises(FastByolError, match="backend must be one of"):
        bench_photometric(16, 4, "cpu", "fastest")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FastByolError, match="TRITON_INTERPRET=1"):
        bench_photometric(16, 4, "cpu", "triton")


def test_steady_rate_reads_the_median_interval():
    """A batch that was already waiting (prefetched) shows as a near-zero interval and does not move the median; the
    mean rate counts it."""
    from fastbyol.tools.bench_augment import _steady_rate

    arrivals = [0.0, 0.1, 0.2, 0.2001, 0.3, 0.4, 0.5]  # one prefetched batch among 0.1 s steps
    median_rate, mean_rate = _steady_rate(arrivals, 64)
    assert median_rate == pytest.approx(640.0) and mean_rate == pytest.approx(6 * 64 / 0.5)
