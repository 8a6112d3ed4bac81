"""A FHIR R4 DiagnosticReport of one segmentation, with its measurements as contained Observations.

Plain JSON built from the job's summary (the service does not need a FHIR library to write it; the
tests validate it against the FHIR R4B resource model of the ``fhir.resources`` package, R4B being
R4's compatible update). Nothing identifies a patient: the report names the job, the slide and,
for a DICOM source, its Study/Series UIDs and accession number, so the LIS files it on the case.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

SYSTEM = "urn:uga-serve"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types (ACSN: accession number)


def _code(code: str, display: str) -> dict:
    return {"coding": [{"system": SYSTEM, "code": code, "display": display}], "text": display}


def _quantity(obs_id: str, code: str, display: str, value: float, unit: str, ucum: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": obs_id,
        "status": "final",
        "code": _code(code, display),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def diagnostic_report(job_id: str, slide: str, summary: dict, queue_url: str, issued: float) -> dict[str, Any]:
    """The DiagnosticReport (R4) of a finished job: tumour area, fraction, mean uncertainty, model."""
    measure = summary["queue"]["measure"]
    observations = [
        _quantity("tumour-area", "tumour-area", "Tumour area", summary["tumour_area_mm2"], "mm2", "mm2"),
        _quantity(
            "tumour-fraction",
            "tumour-fraction",
            "Tumour fraction of the tissue",
            summary["tumour_fraction_of_tissue"],
            "ratio",
            "1",
        ),
        _quantity(
            "mean-uncertainty",
            f"mean-uncertainty-{measure}",
            f"Mean {measure} uncertainty over the tissue",
            summary["mean_uncertainty"][measure],
            "bit",
            "bit",
        ),
        {
            "resourceType": "Observation",
            "id": "model-version",
            "status": "final",
            "code": _code("model-version", "Segmentation model version"),
            "valueString": summary["model_version"],
        },
        {
            "resourceType": "Observation",
            "id": "review-queue",
            "status": "final",
            "code": _code("review-queue", "Patches proposed for review, in the order of the selection strategy"),
            "valueString": queue_url,
        },
    ]
    source = summary.get("source_identifiers") or {}
    identifiers = [{"system": f"{SYSTEM}:job", "value": job_id}]
    if source.get("AccessionNumber"):
        identifiers.append(
            {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": source["AccessionNumber"]}
        )
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if source.get(key):
            identifiers.append({"system": DICOM_UID, "value": f"urn:oid:{source[key]}", "id": key})
    return {
        "resourceType": "DiagnosticReport",
        "id": job_id,
        "identifier": identifiers,
        "status": "preliminary",  # machine output until a pathologist signs it out
        "code": _code("tumour-segmentation", "Tumour segmentation of a whole-slide image"),
        "issued": datetime.fromtimestamp(issued, UTC).isoformat(),
        "performer": [{"display": f"UGA Serve, model {summary['model_version']}"}],
        "contained": observations,
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": (
            f"{slide}: tumour {summary['tumour_area_mm2']:.2f} mm² "
            f"({100 * summary['tumour_fraction_of_tissue']:.1f} % of the tissue); "
            f"mean {measure} uncertainty {summary['mean_uncertainty'][measure]:.3f} bits. "
            "Machine output, not reviewed."
        ),
    }
