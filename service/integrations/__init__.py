"""Talking to the hospital: FHIR reports (and, later, DICOM SEG and DICOMweb)."""
