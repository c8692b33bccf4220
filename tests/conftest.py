"""Shared fixtures: offline hub, Prefect test harness, tiny model, a real S3 server on loopback."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# the CLI runs in subprocesses start their own ephemeral Prefect server: on a loaded 2-core machine
# it can take longer than Prefect's default 20 s to answer
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

from tests.helpers import free_port  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ASD_CACHE", str(tmp_path_factory.getbasetemp() / "asd-cache"))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from asd_models.tiny_model import build_tiny_components, save_components

    return save_components(build_tiny_components(seed=0), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def commit_tiny_model(tiny_model_dir):
    """A function that commits the tiny model into a store as `models/<name>` (its reference)."""
    from artifact_store import ArtifactStore

    def commit(store_url: str, name: str = "tiny") -> str:
        writer = ArtifactStore(store_url).new_version("models", name)
        writer.put_dir(tiny_model_dir)
        return str(writer.commit())

    return commit


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1, with the AWS environment pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket (versioning on) and its store URL."""
    import boto3

    name = "asd-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}/store"


@pytest.fixture(scope="module")
def stored_model(tmp_path_factory, commit_tiny_model):
    """A store (one per test module) with the tiny model committed as `models/tiny`."""
    store_url = str(tmp_path_factory.mktemp("gen") / "store")
    commit_tiny_model(store_url)
    return store_url
