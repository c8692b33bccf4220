"""The floors of the code base (docs/architecture.md): deployments -> flows -> tasks -> (data_engine,
artifact_store, dashboard) -> asd_models, with data_manifests at the bottom importing nothing
of the project. Every import (module level or inside a function) must point down, and no
package's modules may import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from data_manifests.settings import OUTPUT, ROLES, StageSettings

ROOT = Path(__file__).resolve().parent.parent
BELOW = {
    "data_manifests": set(),
    "asd_models": {"data_manifests"},
    "artifact_store": {"data_manifests"},
    "data_engine": {"asd_models", "artifact_store", "data_manifests"},
    "dashboard": {"asd_models", "artifact_store", "data_manifests"},
}
BELOW["tasks"] = set(BELOW) | {"data_engine", "dashboard"}
BELOW["flows"] = BELOW["tasks"] | {"tasks"}
BELOW["deployments"] = BELOW["flows"] | {"flows"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def project_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_import_points_down():
    wrong = []
    for package, allowed in BELOW.items():
        for path in project_files(package):
            for line, module in imports(path):
                top = module.split(".")[0]
                if top in BELOW and top != package and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} {package} -> {top}")
    assert not wrong, "imports that run back up the floors:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", sorted(BELOW))
def test_no_circles_inside_a_package(package):
    modules = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in project_files(package)}
    modules = {m.removesuffix(".__init__"): p for p, m in modules.items()}
    edges = {
        m: {i for _, i in imports(p) if i in modules and i != m and not i == package}
        for m, p in modules.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start] - seen:
            seen.add(nxt)
            if nxt == goal or reaches(nxt, goal, seen):
                return True
        return False

    circles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and reaches(b, a, set()))
    assert not circles, f"modules of {package} that import each other in a circle: {circles}"


def stage_settings() -> list[type[StageSettings]]:
    import tasks.evaluate
    import tasks.generate
    import tasks.ingest
    import tasks.train

    return [
        tasks.ingest.IngestSettings,
        tasks.train.TrainSettings,
        tasks.generate.GenerateSettings,
        tasks.evaluate.EvaluateSettings,
    ]


@pytest.mark.parametrize("model", stage_settings(), ids=lambda m: m.__name__)
def test_every_stage_setting_declares_its_role(model):
    missing = [n for n in model.model_fields if model.role(n) not in ROLES]
    assert not missing, f"{model.__name__}: fields without a role (output(...) or execution(...)): {missing}"
    identity = model().identity()
    assert set(identity) == {n for n in model.model_fields if model.role(n) == OUTPUT}


def test_the_layout_page_names_every_module():
    """The architecture page's layout names every module and sub-package of every package, so a
    newcomer finds each file there (the README's once omitted 15 modules)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1]
    sections: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        head = line.split()[0] if line and not line.startswith(" ") else None
        if head and head.endswith("/"):
            current = head.rstrip("/")
            sections[current] = ""
        if current:
            sections[current] += line
    for package in BELOW:
        names = [p.name for p in (ROOT / package).glob("*.py") if p.name != "__init__.py"]
        names += [
            f"{p.name}/"
            for p in (ROOT / package).iterdir()
            if p.is_dir() and p.name != "__pycache__" and not p.name.endswith(".egg-info")
        ]
        missing = [n for n in names if n not in sections.get(package, "")]
        assert not missing, f"docs/architecture.md: {package}/ does not name {missing}"


def test_every_bench_has_its_page():
    """Each runnable bench has a page in docs/benchmarks/ whose head is generated from the bench's
    own code (its docstring and flags) and which the site's navigation lists."""
    nav = (ROOT / "mkdocs.yml").read_text()
    benches = [p.stem for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text()]
    assert len(benches) >= 15
    for name in benches:
        page = ROOT / "docs" / "benchmarks" / f"{name}.md"
        assert page.is_file(), f"bench/{name}.py has no page docs/benchmarks/{name}.md"
        assert f"<!-- asd:bench:{name} -->" in page.read_text(), f"{page} lacks its generated head"
        assert f"benchmarks/{name}.md" in nav, f"mkdocs.yml's nav does not list {page.name}"
