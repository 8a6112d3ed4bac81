"""Maps as pictures a pathologist reads: uncertainty as a translucent heat map, a mask as its outline,
and the legend that says in words what the colours mean. Pure numpy."""

from __future__ import annotations

import numpy as np

# The scale each map is drawn on (bits; novelty: its squared distance per feature, 1 = typical of the
# training data); values above are drawn as the top colour.
DISPLAY_MAX = {"entropy": 1.0, "mutual_information": 0.5, "uga": 2.0, "novelty": 8.0}
UNITS = {"novelty": "x typical"}  # every other map is in bits
# Low -> high: pale yellow, orange, red; transparent where the model is sure.
RAMP = np.array([[255, 255, 178], [254, 204, 92], [253, 141, 60], [240, 59, 32], [189, 0, 38]], np.float32)
MAX_ALPHA = 0.85
OUTLINE_RGB = (0, 200, 70)

WORDS = {
    "uga": (
        "confident, the five models agree",
        "unsure or the models disagree: look here",
        "UGA score (the ranking measure): uncertainty plus how far the models are from their consensus",
    ),
    "entropy": (
        "sure: clearly tumour or clearly not",
        "a coin flip: tumour probability near 50 %",
        "predictive entropy: how undecided the averaged prediction is",
    ),
    "mutual_information": (
        "the models agree (even if unsure)",
        "the models disagree with each other",
        "mutual information (BALD): disagreement between the models; high where they lack knowledge",
    ),
    "novelty": (
        "looks like the tissue the model was trained on",
        "unlike anything in training: the model may be confidently wrong here",
        "out-of-distribution map: how far this tissue lies from the training data, even where the models agree",
    ),
}


def heat_rgba(values: np.ndarray, measure: str) -> np.ndarray:
    """(h, w, 4) uint8: ``values`` (bits) on the measure's display scale; alpha grows with the value
    (clear where the model is sure, so the tissue stays visible)."""
    t = np.clip(np.nan_to_num(values.astype(np.float32)) / DISPLAY_MAX[measure], 0.0, 1.0)
    pos = t * (len(RAMP) - 1)
    lo = np.minimum(pos.astype(np.int32), len(RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac
    alpha = np.clip(t * 1.6 - 0.1, 0.0, 1.0) * MAX_ALPHA * 255  # clear below 1/16 of the scale: no tint where sure
    return np.dstack([rgb, alpha]).round().astype(np.uint8)


def outline_rgba(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(h, w, 4) uint8: the boundary of a bool mask, ``width`` pixels wide inside it, opaque; else clear."""
    inner = mask.copy()
    for _ in range(width):  # erode by one pixel (4-neighbourhood) per step
        padded = np.pad(inner, 1, constant_values=False)
        inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inner
    out = np.zeros(mask.shape + (4,), np.uint8)
    out[edge] = (*OUTLINE_RGB, 255)
    return out


def legend(measure: str) -> dict:
    """What the heat map's colours mean: its scale in bits, colour stops, and the two ends in words."""
    low, high, what = WORDS[measure]
    top = DISPLAY_MAX[measure]
    stops = [i / (len(RAMP) - 1) for i in range(len(RAMP))]
    colours = [heat_rgba(np.array([[s * top]]), measure)[0, 0].tolist() for s in stops]
    return {
        "measure": measure,
        "what": what,
        "low": low,
        "high": high,
        "unit": UNITS.get(measure, "bits"),
        "max": top,
        "stops": [{"at": s, "value": round(s * top, 3), "rgba": c} for s, c in zip(stops, colours, strict=True)],
    }
