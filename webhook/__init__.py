"""Admission: AdmissionReview in, JSON Patch out."""
