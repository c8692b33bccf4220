"""s3fs options of the store: endpoint from the AWS environment or a Prefect Secret block,
retries with backoff, version-aware reads."""

from __future__ import annotations

import os
from typing import Any, cast

from artifact_store.refs import StoreError
from data_manifests.runtime import runtime

STORE_BLOCK_ENV = "ASD_STORE_BLOCK"


def s3_retries() -> int:
    return runtime().s3_retries


def s3_storage_options() -> dict[str, Any]:
    """s3fs options: endpoint from the AWS environment (or a Prefect Secret block named by
    $ASD_STORE_BLOCK holding s3fs options), retries with backoff, version-aware reads."""
    opts: dict[str, Any] = {
        "version_aware": False,
        # botocore's adaptive retry mode for throttling and connection errors
        "config_kwargs": {
            "retries": {"max_attempts": s3_retries(), "mode": "adaptive"},
            "connect_timeout": 10,
            "read_timeout": 120,
        },
        "default_block_size": 16 << 20,  # multipart upload part size for large files
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    block = runtime().store_block
    if block:
        # the one place the store touches Prefect: an optional credentials block
        # (a Secret block: Prefect 3 removed the JSON block, and these are credentials)
        from prefect.blocks.system import Secret

        try:
            # called from sync code, Prefect's sync-or-async `load` returns the block itself
            value = cast("Secret[Any]", Secret.load(block)).get()
        except Exception as exc:  # noqa: BLE001 - re-raised with the block name only, never its value
            raise StoreError(
                f"cannot load the Prefect Secret block {block!r} named by ${STORE_BLOCK_ENV}"
            ) from exc
        if not isinstance(value, dict):
            raise StoreError(f"Prefect Secret block {block!r} must hold a JSON object of s3fs options")
        opts.update(value)
    return opts
