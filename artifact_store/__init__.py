"""The artifact store: versioned, immutable artifacts with lineage, over any fsspec URL
(a local folder by default, S3 via s3fs). Usable without Prefect.

    refs.py        names, references, version ids, input hashes, errors, PendingVersion
    paths.py       validation of every path taken from records, references and callers
    backend.py     StoreBackend: the files under the root (paths, atomic writes, LATEST pointers)
    writer.py      VersionWriter: files once each, hashed; the commit record last
    leases.py      who writes a pending version now: lease epochs, heartbeat, takeover
    file_lists.py  a large version's file list, in Parquet parts outside its commit record
    faults.py      fault points where tests SIGKILL a writer
    store.py       ArtifactStore: reuse-or-new, resume, commit records, resolve; a facade over
    reading.py     only what a record lists is read; download, verify (unlisted files reported)
    maintenance.py leftovers of killed writers, gc, the catalog
    lineage.py     the version holding a file, a version's ancestors
    fragment_log.py  a pending version's durable fragments (ingest, generation, upscale)
    windows.py     bounded windows over long streams (windowed, bounded_map, batched)
    catalog.py     one Parquet row per committed version
    s3_options.py  s3fs options (endpoint, retries, optional Prefect credentials block)
    redaction.py   display forms of URLs and messages without secrets

Layout under the root URL::

    <kind>/<name>/<version>/...               files, written once
    <kind>/<name>/<version>/_COMMITTED.json   commit record, written last
    <kind>/<name>/<version>/_PENDING.json     while uncommitted and resumable: the job's input hash
    <kind>/<name>/<version>/_LEASES/<n>.json  while uncommitted and resumable: the run writing it
    <kind>/<name>/LATEST                      pointer, written after the commit record
    _catalog/<kind>/<name>/<version>.parquet  catalog row
    runs/<flow_run_id>.json                   what a flow run read and wrote
"""

from artifact_store import file_lists, leases
from artifact_store.redaction import redact, redact_url
from artifact_store.refs import (
    COMMIT_RECORD,
    KINDS,
    ArtifactRef,
    CorruptRecord,
    FileNotListed,
    InvalidReference,
    PendingVersion,
    StoreError,
    VersionNotFound,
    check_name,
    new_version_id,
    params_hash,
)
from artifact_store.s3_options import s3_storage_options
from artifact_store.store import ArtifactStore, store_url_from_env
from artifact_store.writer import VersionWriter

__all__ = [
    "COMMIT_RECORD",
    "KINDS",
    "ArtifactRef",
    "ArtifactStore",
    "CorruptRecord",
    "FileNotListed",
    "InvalidReference",
    "PendingVersion",
    "StoreError",
    "VersionNotFound",
    "VersionWriter",
    "check_name",
    "new_version_id",
    "params_hash",
    "redact",
    "file_lists",
    "leases",
    "redact_url",
    "s3_storage_options",
    "store_url_from_env",
]
