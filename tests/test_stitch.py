import numpy as np
import pytest

from service.inference.stitch import Stitcher, blend_window


def _run(height, width, tile, overlap, values_at, present=None, writes=None):
    """Stitch a full grid into a NaN-filled array: NaN afterwards means the sink never wrote there.

    ``writes``, if given, collects every sink call as (y, x, height, width)."""
    out = np.full((2, height, width), np.nan, np.float32)

    def sink(y, x, v):
        assert v.dtype == np.float32 and v.shape[0] == 2
        if writes is not None:
            writes.append((y, x, v.shape[1], v.shape[2]))
        out[:, y : y + v.shape[1], x : x + v.shape[2]] = v

    st = Stitcher(height, width, tile, overlap, 2, sink)
    s = tile - overlap
    rows, cols = -(-height // s), -(-width // s)
    for r in range(rows):
        for c in range(cols):
            ok = present is None or present(r, c)
            st.add(r, c, values_at(r * s, c * s) if ok else None)
    st.finish()
    return out


@pytest.mark.parametrize("shape", [(700, 900), (512, 512), (130, 1000)])
def test_constant_model_gives_constant_map_without_seams(shape):
    tile, overlap = 128, 16
    out = _run(*shape, tile, overlap, lambda y, x: np.full((2, tile, tile), 0.7, np.float32))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_smooth_field_is_reproduced_exactly_across_overlaps():
    tile, overlap, h, w = 96, 24, 300, 410
    field = np.fromfunction(lambda y, x: np.sin(y / 40) + x / 500, (h + tile, w + tile)).astype(np.float32)
    out = _run(h, w, tile, overlap, lambda y, x: np.stack([field[y : y + tile, x : x + tile]] * 2))
    np.testing.assert_allclose(out[0], field[:h, :w], atol=1e-5)


def test_blending_averages_disagreeing_tiles_smoothly():
    tile, overlap = 64, 16
    # each tile predicts its own constant: blended values must stay within neighbours' range, no jumps
    out = _run(200, 200, tile, overlap, lambda y, x: np.full((2, tile, tile), (x // 48) % 2, np.float32))
    row = out[0, 100]
    assert row.min() >= 0 and row.max() <= 1
    assert np.abs(np.diff(row)).max() <= 1 / overlap + 1e-5  # linear ramp, not a step


def test_skipped_tiles_leave_zeros_and_never_touch_computed_values():
    # 240 x 240, tile 64, overlap 16 -> stride 48, a 5 x 5 grid; only column 0 (x 0..63) is computed.
    # Output blocks are stride-wide (48 px): block column 0 (x 0..47) is fully computed; block column 1
    # (x 48..95) holds the right overlap of column-0 tiles (x 48..63) and nothing else (x 64..95);
    # block columns 2..4 (x 96..239) have no computed tile at all.
    tile, overlap = 64, 16
    writes = []
    out = _run(
        240,
        240,
        tile,
        overlap,
        lambda y, x: np.full((2, tile, tile), 0.5, np.float32),
        present=lambda r, c: c == 0,
        writes=writes,
    )
    np.testing.assert_allclose(out[0, :, :48], 0.5, atol=1e-6)  # interior of column 0 tiles
    # computed values are untouched by the skipped neighbours, in both channels and in the overlap
    # that no other computed tile shares (weight from one tile only -> exactly its value)
    np.testing.assert_allclose(out[:, :, :64], 0.5, atol=1e-6)
    # uncovered pixels inside an emitted block are written, and written as exactly 0
    assert not np.isnan(out[:, :, 64:96]).any()
    assert (out[:, :, 64:96] == 0).all()
    # blocks with no computed tile are never handed to the sink (no I/O for glass): still NaN
    assert np.isnan(out[:, :, 96:]).all()
    assert writes and all(x + w <= 96 for _, x, _, w in writes), writes
    assert {x for _, x, _, _ in writes} == {0, 48}
    # ... while every row of the slide is written in the emitted block columns, each pixel once
    cover = np.zeros((240, 240), int)
    for y, x, h, w in writes:
        cover[y : y + h, x : x + w] += 1
    assert (cover[:, :96] == 1).all() and (cover[:, 96:] == 0).all()


def test_window_ramps_are_complementary():
    w = blend_window(64, 16)
    edge = w[32, :]
    np.testing.assert_allclose(edge[48:] + edge[:16], 1.0, atol=1e-6)
    assert w.min() > 0
