"""The README's orchestration section, as a user runs it: a Prefect server on 127.0.0.1, an S3
server (moto, versioning on), `asd deploy`, a process worker per pool started in an unrelated
folder, `prefect deployment run 'asd-pipeline/quick' --watch`, a two-partition backfill (and its
re-run, which skips both), `asd store verify`, the parent run's artifacts, the dashboard served
and both pages checked in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.browser import Browser, chromium_path
from tests.helpers import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 600) -> str:
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}:\n{text[-4000:]}"
    return text


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "server.log"
    proc = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path,
        log,
    )
    try:
        _wait_http(f"{api}/health", 180, proc, log)
        yield env
    finally:
        _stop(proc)


def test_deploy_run_backfill_and_dashboards_as_a_user_does(prefect_server, s3_bucket, tmp_path):
    if chromium_path() is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    env = {**prefect_server, **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    elsewhere = tmp_path / "somewhere-else"  # workers and commands run far from the repository
    elsewhere.mkdir()
    asd, prefect = str(BIN / "asd"), str(BIN / "prefect")
    out = _run([asd, "deploy", "--store", s3_bucket], env, elsewhere)
    assert "asd-pipeline/quick" in out and "prefect worker start --pool gpu" in out
    workers = [
        _start([prefect, "worker", "start", "--pool", pool], env, elsewhere, tmp_path / f"worker-{pool}.log")
        for pool in ("gpu", "cpu")
    ]
    try:
        out = _run([prefect, "deployment", "run", "asd-pipeline/quick", "--watch"], env, elsewhere)
        assert "Completed" in out, out[-3000:]
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        backfill = [
            asd,
            "backfill",
            "asd-generate/generate",
            "--dates",
            "2026-11-01..2026-11-02",
            "--param",
            "model_ref=models/quick@latest",
            "--param",
            "prompts_ref=prompts/quick@latest",
            "--param",
            'settings={"steps": 4, "shard_size": 3}',
        ]
        out = _run(backfill, env, elsewhere)
        assert out.count("COMPLETED") == 2, out[-3000:]
        out = _run(backfill, env, elsewhere)  # the re-run skips what is committed
        assert out.count("SKIPPED (committed)") == 2, out[-3000:]
    finally:
        for w in workers:
            _stop(w)
    _run([asd, "--store", s3_bucket, "store", "verify"], env, elsewhere)

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        run = client.read_flow_run(run_id)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    keys = {a.key for a in arts}
    assert {"pipeline-summary", "report-link", "images-link", "gallery-link", "dashboard-link"} <= keys
    summary = next(a for a in arts if a.key == "pipeline-summary").data
    assert "generations/quick@" in summary and "kid_patch" in summary

    _run([asd, "dashboard", "build", "--store", s3_bucket], env, elsewhere)
    port = free_port()
    serve_log = tmp_path / "dashboard.log"
    server = _start(
        [asd, "dashboard", "serve", "--store", s3_bucket, "--port", str(port)], env, elsewhere, serve_log
    )
    shots = Path(os.environ.get("ASD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", 60, server, serve_log)
        with Browser() as browser:
            browser.open(
                f"http://127.0.0.1:{port}/_site/index.html", "document.body.dataset.imagesTotal !== undefined"
            )
            text = browser.evaluate("document.body.innerText")
            assert "generations/daily-2026-11-01@" in text and "generations/quick@" in text
            total, loaded = (
                int(browser.evaluate(f"document.body.dataset.{k}")) for k in ("imagesTotal", "imagesLoaded")
            )
            assert total >= 3 and loaded == total  # trend plot + previews, every one decoded
            browser.screenshot(shots / "dashboard-index.png")
            gallery = browser.evaluate(
                "[...document.links].map(a => a.href).find(h => h.includes('/generations/quick/'))"
            )
            browser.open(gallery, "document.body.dataset.imagesTotal !== undefined")
            total, loaded = (
                int(browser.evaluate(f"document.body.dataset.{k}")) for k in ("imagesTotal", "imagesLoaded")
            )
            failed = browser.evaluate(
                "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            )
            assert total == 6 and loaded == total, (
                failed,
                serve_log.read_text()[-2000:],
            )  # 3 thumbnails + 3 heat-maps
            browser.screenshot(shots / "dashboard-gallery.png")

            ui = env["PREFECT_API_URL"].removesuffix("/api")
            browser.open(
                f"{ui}/runs/flow-run/{run_id}", f"document.body.innerText.includes({run.name!r})", 90
            )
            browser.evaluate(
                "[...document.querySelectorAll('button, a, li, div, [role=tab]')]"
                ".filter(e => e.innerText.trim() === 'Artifacts').forEach(e => e.click())"
            )
            browser.wait("document.body.innerText.includes('pipeline-summary')")
            assert browser.screenshot(shots / "prefect-run.png").stat().st_size > 20_000
    finally:
        _stop(server)
    shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)
