"""`asd model ...`: the models users already have, brought into the store (`import`), and the
store's models listed (`ls`) and shown (`show`) with their family and source."""

from __future__ import annotations

import argparse
import json

from flows.cli.common import OneLineParser, UserError, ref_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("model", help="import a model you have; list and show the store's models")
    msub = m.add_subparsers(dest="model_cmd", required=True, parser_class=OneLineParser)
    imp = msub.add_parser(
        "import",
        help="a diffusers folder, a hub id in the local HF cache, or a single-file .safetensors -> models/NAME",
    )
    imp.add_argument(
        "source",
        help="a local diffusers pipeline folder, a hub id already in the HF cache, or a single-file "
        "checkpoint .safetensors (A1111/ComfyUI; its family read from its keys)",
    )
    imp.add_argument(
        "--config",
        help="a single file's configs: a diffusers folder or cached hub id of its family (default: "
        "diffusers' model of the type its keys say, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5); "
        "components the file lacks (FLUX files hold only the transformer) are taken from it",
    )
    imp.add_argument("--name", required=True, help="the model's name in the store (models/NAME)")
    imp.add_argument("--rerun", action="store_true", help="import again even when the same bytes are stored")
    msub.add_parser("ls", help="every model version: family, source, how it was made")
    show = msub.add_parser("show", help="one model's record: family, source, component configs")
    show.add_argument("ref", help="NAME, NAME@VERSION or models/NAME@VERSION")
    m.set_defaults(func=cmd_model)


def _made_by(rec: dict) -> str:
    params = rec.get("params") or {}
    if params.get("content_sha256"):
        return f"imported from {params.get('source')}"
    if params.get("base_model"):
        return f"trained from {params['base_model']}"
    return params.get("builder") or "-"


def _family(rec: dict) -> str:
    params = rec.get("params") or {}
    return str(params.get("family") or (rec.get("summary") or {}).get("family") or "sd")


def cmd_model(args: argparse.Namespace) -> int:
    from tasks.runtime import open_store

    store = open_store(args.store)
    if args.model_cmd == "import":
        from artifact_store import check_name
        from flows.stages import model_import_flow
        from tasks.model_import import open_model_source

        check_name(args.name)
        open_model_source(args.source, args.config)  # a source that is not a model: one line, before any flow
        print(model_import_flow(args.source, args.name, store.url, args.rerun, args.config))
        return 0
    if args.model_cmd == "ls":
        found = False
        for kind, name in store.list_artifacts():
            if kind != "models":
                continue
            for ref in store.list_versions(kind, name):
                rec = store.record(ref)
                print(f"{ref}  {_family(rec)}  {_made_by(rec)}")
                found = True
        if not found:
            print(f"(no models in {store.display_url}: `asd model import` or `asd train` makes one)")
        return 0
    given = ref_arg(args.ref, "models")
    rec = store.record(given)
    ref = store.resolve(given)
    if not str(ref).startswith("models/"):
        raise UserError(f"{ref} is not a model")
    params = rec.get("params") or {}
    shown = {
        "ref": str(ref),
        "family": _family(rec),
        "made": _made_by(rec),
        "committed_at": rec.get("committed_at"),
        "parents": rec.get("parents"),
        "summary": rec.get("summary"),
        "components": {k: _brief(v) for k, v in (params.get("components") or {}).items()},
    }
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _brief(config: dict) -> dict:
    """A component config's identifying fields (its class and sizes)."""
    keep = (
        "_class_name",
        "sample_size",
        "in_channels",
        "out_channels",
        "block_out_channels",
        "cross_attention_dim",
        "latent_channels",
        "scaling_factor",
        "shift_factor",
        "addition_embed_type",
        "hidden_size",
        "num_hidden_layers",
        "prediction_type",
        "num_train_timesteps",
    )
    return {k: config[k] for k in keep if k in config}
