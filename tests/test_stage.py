"""The one stage protocol (`tasks.stage.run_stage`) on a stage made for the test: reuse by
identity, a new version when the identity changes, no commit when the build stops early, and
every stage's flow taking the parameter its declaration names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

from artifact_store import ArtifactStore
from tasks.stage import Built, Inputs, Stage, StageRun, run_stage


@dataclass(frozen=True)
class Echo(Stage):
    flow: ClassVar[str] = "test-echo"
    output_param: ClassVar[str] = "name"
    kind: ClassVar[str] = "prompts"
    text: str
    commit: bool = True

    def resolve(self, store: ArtifactStore) -> Inputs:
        return Inputs(reads=["(test)"], parents=[], identity={"text": self.text})

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        run.writer.put_bytes("text.txt", self.text.encode())
        return Built(params={"text": self.text}, summary={"chars": len(self.text)}, commit=self.commit)


def test_reuse_by_identity_new_version_when_it_changes_and_no_commit_when_stopped(tmp_path):
    url = str(tmp_path / "store")
    first = run_stage(Echo("hello"), "echo", url)
    assert not first.reused and first.built.summary == {"chars": 5}
    store = ArtifactStore(url)
    assert store.read_bytes(first.ref, "text.txt") == b"hello"
    assert store.record(first.ref)["params"] == {"text": "hello"}
    again = run_stage(Echo("hello"), "echo", url)
    assert again.reused and again.ref == first.ref and again.built is None
    assert run_stage(Echo("hello"), "echo", url, rerun=True).ref != first.ref
    other = run_stage(Echo("bye"), "echo", url)
    assert not other.reused and other.ref != first.ref
    stopped = run_stage(Echo("unfinished", commit=False), "echo", url)
    assert stopped.ref == "" and not stopped.reused
    assert len(store.list_versions("prompts", "echo")) == 3  # hello, hello (rerun), bye


def test_each_flow_takes_the_parameter_its_stage_names():
    from flows.stages import evaluate_flow, generate_flow, ingest_flow, train_flow
    from tasks.evaluate import Evaluate
    from tasks.generate import Generate
    from tasks.ingest import Ingest
    from tasks.train import Arad

    for flow, stage in (
        (ingest_flow, Ingest),
        (train_flow, Arad),
        (generate_flow, Generate),
        (evaluate_flow, Evaluate),
    ):
        params = inspect.signature(flow.fn).parameters
        assert stage.output_param in params, (flow.name, stage.output_param)
        assert flow.name == stage.flow
    assert Generate.prompts_param in inspect.signature(generate_flow.fn).parameters


def test_the_environment_is_read_in_one_typed_place(monkeypatch):
    """Every ASD_* variable is a field of RuntimeSettings; no other module reads one (the
    tests' fault points, read by artifact_store.faults, are the one seam outside it)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readers = []
    for pkg in (
        "asd_models",
        "artifact_store",
        "data_engine",
        "dashboard",
        "tasks",
        "flows",
        "deployments",
        "data_manifests",
    ):
        for path in (root / pkg).rglob("*.py"):
            if path.relative_to(root).as_posix() in ("artifact_store/faults.py", "data_manifests/runtime.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                args = (
                    node.args[:1]
                    if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "getenv")
                    else [node.slice]
                    if isinstance(node, ast.Subscript)
                    else []
                )
                text = ast.unparse(node)
                if ("environ" in text or "getenv" in text) and any(
                    (isinstance(a, ast.Constant) and str(a.value).startswith("ASD_"))
                    or (isinstance(a, ast.Name) and a.id.endswith("_ENV"))
                    for a in args
                ):
                    readers.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not readers, f"ASD_* read outside data_manifests/runtime.py: {readers}"

    from data_manifests.runtime import runtime
    from tasks.generate import Generate, GenerateSettings

    monkeypatch.setenv("ASD_EXECUTOR", "dask")
    monkeypatch.setenv("ASD_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    monkeypatch.setenv("ASD_S3_RETRIES", "3")
    assert runtime().s3_retries == 3
    job = Generate("models/m@v", "prompts/p@v", GenerateSettings())
    assert job.pinned({}).executor == "dask" and job.pinned({}).dask_address == "tcp://10.0.0.1:8786"
    mine = Generate(
        "models/m@v", "prompts/p@v", GenerateSettings(executor="dask", dask_address="tcp://127.0.0.1:1")
    )
    assert mine.pinned({}).dask_address == "tcp://127.0.0.1:1"  # the job's own choice wins
