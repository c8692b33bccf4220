"""`asd deploy`: work pools and deployments of prefect.yaml registered with a Prefect server."""

from __future__ import annotations

import argparse
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser(
        "deploy",
        help="create the work pools and register the deployments with a Prefect server",
        description="Registers every deployment of deployments/prefect.yaml (or --file) with the "
        "server at PREFECT_API_URL, creating its work pools; the store (--store, else $ASD_STORE) "
        "goes into each deployment's environment.",
    )
    dp.add_argument(
        "--only", action="append", help="a deployment name or FLOW/NAME (repeatable; default: all)"
    )
    dp.add_argument(
        "--file", help="a prefect.yaml of your own (default: the packaged deployments/prefect.yaml)"
    )
    dp.add_argument("--list", action="store_true", help="list the deployments of the file and stop")
    dp.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import DEFINITIONS, deploy_all, load_specs

    if args.list:
        for spec in load_specs(args.file or DEFINITIONS):
            print(f"{spec.full_name:32s} pool {spec.work_pool:6s} {spec.description or ''}")
        return 0
    done = deploy_all(args.store, dict(os.environ), args.file or DEFINITIONS, args.only)
    from prefect.settings import PREFECT_API_URL

    print(f"registered {len(done)} deployment(s) with {PREFECT_API_URL.value()}:")
    for name, pool, dep_id in done:
        print(f"  {name:32s} work pool {pool:6s} {dep_id}")
    pools = sorted({pool for _, pool, _ in done})
    print(
        "start a worker per pool, from this environment:\n"
        + "".join(f"  prefect worker start --pool {p}\n" for p in pools)
        + f"then: prefect deployment run '{done[0][0]}' --watch"
    )
    return 0
