"""Data in: formats, DICOM, ingestion and its ledger, arrival watching, preprocessing on Dask."""
