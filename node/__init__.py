"""Chest-CT triage node: receive CT by DICOM, classify it, send a TID 1500 SR back to the PACS."""

__version__ = "0.1.0"
