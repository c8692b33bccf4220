"""The data engine: image-caption pairs from strangers -> a bucketed dataset version, split as
img2dataset splits it (reader -> downloader -> resizer -> writer). No Prefect here.

    sources.py         reader: folder trees, URL lists, WebDataset / img2dataset shards -> records
    fetch.py           downloader: http(s) / s3 / file bytes with deadlines, caps and retries
    samples.py         resizer: decode, validate, orient, bucket, resize-to-cover + crop, re-encode
    url_lists.py       URL lists as streams of (url, caption) rows, any format
    partitions.py      the inputs cut into partitions (plan files in the pending version)
    shards.py          writer: per-bucket WebDataset shard sets and wids indexes in a store version
    engine.py          one partition: reuse or build its rows and shards, its manifest fragment
    merge.py           every partition into one version: duplicates across partitions, indexes
    dataset_reader.py  reading a committed dataset back (bucket index, shards, samples)
"""
