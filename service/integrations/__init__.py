"""Talking to the hospital: DICOMweb, DICOM Segmentation, FHIR reports."""
