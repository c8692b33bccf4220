"""The data engine: image-caption pairs from strangers -> a bucketed dataset version, split as
img2dataset splits it (reader -> downloader -> resizer -> writer). No Prefect here.

    sources.py         reader: folder trees, URL lists, WebDataset / img2dataset shards -> records
    fetch.py           downloader: http(s) / s3 / file bytes with deadlines, caps and retries
    samples.py         resizer: decode, validate, orient, bucket, resize-to-cover + crop, re-encode
    shards.py          writer: per-bucket WebDataset shard sets and wids indexes in a store version
    engine.py          the driver: reuse or build, incremental copy, manifest, commit
    dataset_reader.py  reading a committed dataset back (bucket index, shards, samples)
"""
