"""The stages, one module each (ingest, prompts, train, generate, evaluate: settings, adapter to
the science, identity, build, summary), the one protocol they share (`stage.run_stage`), and the
run context (Prefect run ids and logger, progress and UI artifacts, run records, executors, the
per-worker model cache)."""
