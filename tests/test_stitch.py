import numpy as np
import pytest

from service.inference.stitch import Stitcher, blend_window


def _run(height, width, tile, overlap, values_at, present=None):
    out = np.full((2, height, width), np.nan, np.float32)

    def sink(y, x, v):
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
    tile, overlap = 64, 16
    out = _run(
        240,
        240,
        tile,
        overlap,
        lambda y, x: np.full((2, tile, tile), 0.5, np.float32),
        present=lambda r, c: c == 0,
    )
    np.testing.assert_allclose(out[0, :, :48], 0.5, atol=1e-6)  # interior of column 0 tiles
    assert np.nan_to_num(out[0, :, 64:], nan=0).max() == 0  # never computed -> zeros (sink default)


def test_window_ramps_are_complementary():
    w = blend_window(64, 16)
    edge = w[32, :]
    np.testing.assert_allclose(edge[48:] + edge[:16], 1.0, atol=1e-6)
    assert w.min() > 0
