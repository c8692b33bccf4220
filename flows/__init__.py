"""Prefect flows: thin shells that name a stage and run it through `tasks.stage.run_stage`, the
whole pipeline, backfills, registering deployments, and the `asd` CLI (`flows.cli`)."""
