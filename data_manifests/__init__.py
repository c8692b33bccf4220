"""Manifest schemas (one place) and the small checked-in source manifests for the demo."""
