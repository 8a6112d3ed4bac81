"""DICOM whole-slide series for tests, made from a generated TIFF by Orthanc's WSI dicomizer (Debian
`orthanc-wsi`): one instance per level, or concatenated (a level split over several instances)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

DICOMIZER = shutil.which("OrthancWSIDicomizer")
ACCESSION = "ACC-2026-0042"


def dicomize(slide: Path, out: Path, *, mpp: float, concatenated: bool) -> Path:
    """``out`` filled with the series of ``slide``. Concatenated: at most 1 MB per instance."""
    out.mkdir(parents=True)
    sample = subprocess.run([DICOMIZER, "--sample-dataset"], capture_output=True, text=True, check=True).stdout
    dataset = json.loads(sample[sample.index("{") :])
    dataset["AccessionNumber"] = ACCESSION
    (out.parent / f"{out.name}-dataset.json").write_text(json.dumps(dataset))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(slide) as im:
        width_mm, height_mm = im.width * mpp / 1000, im.height * mpp / 1000
    cmd = [
        DICOMIZER,
        "--dataset", str(out.parent / f"{out.name}-dataset.json"),
        "--imaged-width", f"{width_mm}", "--imaged-height", f"{height_mm}",
        "--max-size", "1" if concatenated else "0",
        "--folder", str(out),
        str(slide),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return out
