"""Prefect deployments: `prefect.yaml` (registered by `asd deploy`, `flows.deploy`) and
`serve.py`, which serves every flow from one process."""
