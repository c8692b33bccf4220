"""`asd deploy`: register the deployments of `prefect.yaml` with a Prefect server.

It creates the work pools the file names (process pools) when they are missing, then registers
each deployment through Prefect's own `RunnerDeployment.apply`, with a module-path entrypoint of
the installed package (no pull steps, so no path on the worker to get wrong), the file's schedules
(none where it says `schedules: []`), and the store written into the job variables (env
`ASD_STORE`). Nothing asks a question; every problem is one `DeployError` line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFINITIONS = (
    Path(__file__).resolve().parent.parent / "deployments" / "prefect.yaml"
)  # the file, not a module: read, not imported
STORE_ENV = "ASD_STORE"  # RuntimeSettings.store of every run of a deployment, set in its job variables


class DeployError(Exception):
    """A deployment cannot be registered as asked (one line for the user)."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One `deployments:` entry of prefect.yaml."""

    name: str
    entrypoint: str  # module path: package.module.flow_function
    work_pool: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()
    description: str | None = None
    concurrency_limit: int | None = None
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] = field(default_factory=dict)
    work_queue: str | None = (
        None  # a queue of the pool (a worker started with --work-queue takes only its runs)
    )

    def load_flow(self) -> Any:
        """The flow object behind the entrypoint, imported from the installed package."""
        from prefect.utilities.importtools import import_object

        try:
            return import_object(self.entrypoint)
        except (ImportError, AttributeError, ValueError) as exc:
            raise DeployError(
                f"deployment {self.name!r}: entrypoint {self.entrypoint!r} does not import from "
                f"this environment ({exc}); install the package here (pip install -e .)"
            ) from exc

    @property
    def full_name(self) -> str:
        return f"{self.load_flow().name}/{self.name}"


def load_specs(path: str | Path = DEFINITIONS) -> list[DeploymentSpec]:
    """Parse and check prefect.yaml: every entry names an entrypoint by module, a work pool and a
    `schedules` key (possibly empty), so nothing is left to a prompt."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"cannot read the deployment file {path}: {exc}") from exc
    entries = (doc or {}).get("deployments") or []
    if not entries:
        raise DeployError(f"{path} defines no deployments")
    specs, seen = [], set()
    for i, d in enumerate(entries):
        where = f"{path.name}, deployment {d.get('name') or i}"
        entrypoint = d.get("entrypoint") or ""
        if not entrypoint or ".py" in entrypoint or ":" in entrypoint:
            raise DeployError(
                f"{where}: entrypoint {entrypoint!r} must be a module path (flows.stages.ingest_flow), "
                "so workers run the installed package and no code location is needed"
            )
        pool = (d.get("work_pool") or {}).get("name")
        if not pool:
            raise DeployError(f"{where}: no work_pool.name")
        if "schedules" not in d:
            raise DeployError(f"{where}: no `schedules:` key (write `schedules: []` for none)")
        if (d["name"], entrypoint) in seen:
            raise DeployError(f"{where}: defined twice")
        seen.add((d["name"], entrypoint))
        specs.append(
            DeploymentSpec(
                name=d["name"],
                entrypoint=entrypoint,
                work_pool=pool,
                parameters=d.get("parameters") or {},
                schedules=tuple(d.get("schedules") or ()),
                description=d.get("description"),
                concurrency_limit=d.get("concurrency_limit"),
                tags=tuple(d.get("tags") or ()),
                job_variables=dict((d.get("work_pool") or {}).get("job_variables") or {}),
                work_queue=(d.get("work_pool") or {}).get("work_queue_name"),
            )
        )
    return specs


def check_api_url() -> str:
    """Deployments live on a Prefect server (the temporary in-process one would vanish with us):
    PREFECT_API_URL must be set and the server must answer."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError(
            "no Prefect server to deploy to: set PREFECT_API_URL (after `prefect server start`: "
            "prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise DeployError(
            f"the Prefect server at {url} does not answer ({' '.join(str(failure).split())}); "
            "is `prefect server start` running? It takes about 20 s to come up"
        )
    return url


def deployment_store(store: str | None, env: dict[str, str]) -> str:
    """The store URL the deployments will use: given, else $ASD_STORE; a local path is made
    absolute (a worker's directory is not ours); credentials inside the URL are refused (they
    would be stored in the deployment for anyone with API access to read)."""
    from artifact_store import ArtifactStore, redact_url

    raw = store or env.get(STORE_ENV)
    if not raw:
        raise DeployError(
            "no store for the deployments: pass --store URL (a local folder or s3://bucket/prefix) "
            "or set ASD_STORE"
        )
    if redact_url(raw) != raw:
        raise DeployError(
            f"the store URL {redact_url(raw)} carries credentials; give them to the workers through "
            "AWS_* variables or a Prefect block ($ASD_STORE_BLOCK), not in the URL"
        )
    return ArtifactStore(raw).url


def ensure_work_pools(names: list[str]) -> list[str]:
    """Create the missing work pools (process type); returns the names created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(name)
    return created


def _schedules(spec: DeploymentSpec) -> list[Any]:
    from prefect.schedules import Cron, Interval

    out = []
    for s in spec.schedules:
        if "cron" in s:
            out.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True)))
        elif "interval" in s:
            out.append(Interval(s["interval"], timezone=s.get("timezone"), active=s.get("active", True)))
        else:
            raise DeployError(f"deployment {spec.name!r}: schedule {s} has neither cron nor interval")
    return out


def deploy_all(
    store: str | None, env: dict[str, str], path: str | Path = DEFINITIONS, only: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """Register the deployments (all, or those whose name or flow/name is in `only`).
    Returns (flow/deployment, work pool, id) of each."""
    from prefect.types.entrypoint import EntrypointType

    from artifact_store.writer import code_version

    check_api_url()
    store_url = deployment_store(store, env)
    specs = load_specs(path)
    if only:
        wanted = set(only)
        specs = [s for s in specs if s.name in wanted or s.full_name in wanted]
        missing = wanted - {s.name for s in specs} - {s.full_name for s in specs}
        if missing:
            raise DeployError(f"no deployment named {', '.join(sorted(missing))} in {Path(path).name}")
    flows = {s.name: s.load_flow() for s in specs}  # every import and parameter set checked first
    for spec in specs:
        try:
            flows[spec.name].validate_parameters(spec.parameters)
        except Exception as exc:  # noqa: BLE001 - Prefect's ParameterTypeError / pydantic errors
            raise DeployError(
                f"deployment {spec.name!r}: its parameters do not fit the flow: "
                f"{' '.join(str(exc).split())[:400]}"
            ) from exc
    ensure_work_pools([s.work_pool for s in specs])
    version = code_version()
    done = []
    for spec in specs:
        job_vars = dict(spec.job_variables)
        job_vars["env"] = {**job_vars.get("env", {}), STORE_ENV: store_url}
        deployment = flows[spec.name].to_deployment(
            name=spec.name,
            schedules=_schedules(spec),
            parameters=spec.parameters,
            description=spec.description,
            concurrency_limit=spec.concurrency_limit,
            tags=list(spec.tags),
            version=version,
            job_variables=job_vars,
            entrypoint_type=EntrypointType.MODULE_PATH,
            work_queue_name=spec.work_queue,
        )
        try:
            deployment_id = deployment.apply(work_pool_name=spec.work_pool)
        except Exception as exc:  # noqa: BLE001 - the server's answer, as one line
            raise DeployError(f"deployment {spec.full_name} was refused by the server: {exc}") from exc
        done.append((spec.full_name, spec.work_pool, str(deployment_id)))
    return done
