"""Prefect deployments (prefect.yaml) and a helper to serve them locally."""
