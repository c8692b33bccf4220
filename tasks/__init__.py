"""Prefect tasks: thin, typed wrappers that read from the store, call asd_models, write back."""
