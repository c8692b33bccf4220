"""`asd dashboard build|serve`: the store's static dashboard."""

from __future__ import annotations

import argparse

from flows.cli.common import OneLineParser, UserError, int_in


def add_parser(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("dashboard", help="a static dashboard of the store (_site/), built from the catalog")
    dsub = db.add_subparsers(dest="dashboard_cmd", required=True, parser_class=OneLineParser)
    dbb = dsub.add_parser("build", help="write or refresh _site/ in the store")
    dbb.add_argument(
        "--thumb-px", type=int_in(16, 4096), default=256, help="longest side of the thumbnails (default: 256)"
    )
    dbb.add_argument(
        "--max-images",
        type=int_in(0, 1_000_000),
        default=200,
        help="images shown per generations version (default: 200)",
    )
    dbs = dsub.add_parser("serve", help="serve the store's dashboard on this machine")
    dbs.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    dbs.add_argument(
        "--port", type=int_in(0, 65535), default=8000, help="port (default: 8000; 0: any free port)"
    )
    db.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore

    store = ArtifactStore(args.store)
    if args.dashboard_cmd == "build":
        from prefect.settings import PREFECT_UI_URL

        from dashboard.build import build_site

        built = build_site(
            store, thumb_px=args.thumb_px, max_images=args.max_images, prefect_ui=PREFECT_UI_URL.value()
        )
        print(
            f"dashboard: {built.pages} pages, {built.pictures_made} pictures made, {built.pictures_reused} reused"
        )
        print(f"open {built.index}" + ("  (or: asd dashboard serve)" if store.is_local else ""))
        return 0
    from dashboard.server import make_server

    try:
        server = make_server(store, args.host, args.port)
    except OSError as exc:  # an unresolvable host, a port in use or not ours to take
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = str(server.server_address[0]), server.server_address[1]
    print(
        f"serving the dashboard of {store.display_url} at http://{host}:{port}/_site/index.html (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
