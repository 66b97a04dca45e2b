"""The CUDA arrays graph hands the online probe each batch's rows through a second output of its external source
(pipelines.array_source). Run here on the CPU: the same source and operator as the GPU graph, followed by the CPU
graph's random draws (crop windows and photometric parameters), with and without the rows output."""

import numpy as np

from fastbyol.augment import pipelines
from fastbyol.augment.views import VIEW1, VIEW2


def _graph(source, rows: bool):
    from nvidia.dali import fn, types

    pixels, index = pipelines.array_source(source, rows)
    shape = fn.constant(idata=[12, 10], dtype=types.INT64)
    outs = [pixels]
    for spec in (VIEW1, VIEW2):
        outs += list(pipelines.crop_window_and_params(shape, spec))
    return tuple(outs) + ((index,) if rows else ())


def _batches(images, rows: bool, steps: int) -> list:
    source = pipelines.EpochSource(images, 8, seed=3, shard_id=0, num_shards=1, with_rows=rows)
    pipe = pipelines.build_pipeline(pipelines.DaliGraph(_graph, (source, rows), 8, 1, None, 7), None)
    out = []
    while len(out) < steps:
        try:
            outputs = pipe.run()
        except StopIteration:  # an epoch's end: the next one reshuffles
            pipe.reset()
            continue
        out.append([np.stack([np.asarray(t) for t in o]) for o in outputs])
    return out


def test_the_rows_output_names_each_samples_row_and_changes_no_draw():
    images = np.random.default_rng(0).integers(0, 256, size=(40, 12, 10, 3), dtype=np.uint8)
    plain, with_rows = _batches(images, False, 7), _batches(images, True, 7)  # 7 steps: into the second epoch (5 an epoch)
    for a, b in zip(plain, with_rows):
        assert len(b) == len(a) + 1
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)  # the pixels and every window and parameter drawn
        rows = b[-1].reshape(-1)
        assert rows.dtype == np.int64 and len(set(rows.tolist())) == 8
        np.testing.assert_array_equal(images[rows], b[0])  # each row is its sample's
