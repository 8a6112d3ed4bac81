"""DICOM whole-slide series for tests, made from a generated TIFF by Orthanc's WSI dicomizer (Debian
`orthanc-wsi`) in three layouts: "one" (one instance per level, --max-size 0: what OpenSlide reads),
"default" (the dicomizer's defaults: concatenation UIDs, which OpenSlide refuses) and "split" (a level
split over several concatenated instances, at most 1 MB each)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from pydicom.uid import generate_uid

DICOMIZER = shutil.which("OrthancWSIDicomizer")
ACCESSION = "ACC-2026-0042"


MAX_SIZE = {"one": ["--max-size", "0"], "default": [], "split": ["--max-size", "1"]}


def dicomize(slide: Path, out: Path, *, mpp: float, layout: str) -> Path:
    """``out`` filled with the series of ``slide`` in ``layout`` (one, default, split)."""
    out.mkdir(parents=True)
    sample = subprocess.run([DICOMIZER, "--sample-dataset"], capture_output=True, text=True, check=True).stdout
    dataset = json.loads(sample[sample.index("{") :])
    dataset["AccessionNumber"] = ACCESSION
    dataset["FrameOfReferenceUID"] = generate_uid()  # a tiled SEG refers to it (Orthanc leaves it out)
    (out.parent / f"{out.name}-dataset.json").write_text(json.dumps(dataset))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(slide) as im:
        width_mm, height_mm = im.width * mpp / 1000, im.height * mpp / 1000
    cmd = [
        DICOMIZER,
        "--dataset", str(out.parent / f"{out.name}-dataset.json"),
        "--imaged-width", f"{width_mm}", "--imaged-height", f"{height_mm}",
        *MAX_SIZE[layout],
        "--folder", str(out),
        str(slide),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return out


def check_fhir_report(report: dict, job: dict) -> None:
    """Valid FHIR R4 (the R4B model of fhir.resources), and the numbers are the job's."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    parsed = DiagnosticReport.model_validate(report)
    assert parsed.status == "preliminary" and len(parsed.result) == 5
    observations = {o.id: o for o in parsed.contained}
    assert {r.reference.lstrip("#") for r in parsed.result} == set(observations)
    summary = job["summary"]
    assert float(observations["tumour-area"].valueQuantity.value) == summary["tumour_area_mm2"]
    assert float(observations["tumour-fraction"].valueQuantity.value) == summary["tumour_fraction_of_tissue"]
    assert observations["model-version"].valueString == job["model_version"]
    assert observations["review-queue"].valueString.startswith("/v1/queue?slide=")
