"""Prefect flows: compose tasks, own parameters (pydantic), fan out, publish UI artifacts."""
