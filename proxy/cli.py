"""The ``vlcache`` command line: thin calls into the packages.

Every setting of ``proxy.settings.Settings`` is a flag of ``serve`` (and of the other commands
that need it); flags override ``VLCACHE_*`` environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import Settings, describe_settings

log = logging.getLogger(__name__)

_STORE_SETTINGS = ("data_dir", "db", "log_level")
_EMBEDDER_SETTINGS = (
    "embedder",
    "clip_model",
    "clip_pretrained",
    "embed_precision",
    "embed_runtime",
    "embed_threads",
    "index_approx_rows",
)
_WARMUP_SETTINGS = (
    *_STORE_SETTINGS,
    "embedder",
    "clip_model",
    "clip_pretrained",
    "embed_precision",
    "embed_runtime",
    "embed_threads",
    "shared_namespace",
    "ttl",
    "max_body_bytes",
    "max_images",
    "max_image_bytes",
    "max_image_pixels",
    "image_fetch_timeout",
    "allow_private_image_urls",
)


def _add_settings(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    group = parser.add_argument_group("settings (also VLCACHE_<NAME> environment variables)")
    for flag, env, default, help_text in describe_settings():
        name = flag[2:].replace("-", "_")
        if names is not None and name not in names:
            continue
        annotation = Settings.model_fields[name].annotation
        text = f"{help_text} [{env}, default: {default}]"
        if annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        else:
            group.add_argument(flag, dest=name, default=None, metavar="VALUE", help=text)


def _settings(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            (f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise SystemExit(f"vlcache: invalid settings: {problems}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The format names no source line, thread or process: skip finding them for every record
    # (the logging HOWTO's "Optimization" section; measured alone, 7.2 -> 5.5 us per line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Alembic announces each of its plugins at INFO; the migration lines themselves stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # The ONNX exporter's passes log dozens of INFO lines per export (one per deduplicated
    # initializer); embeddings.onnx_runtime says in one line what was exported, where.
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="vlcache",
        description="A semantic response cache for vision-language models (Qwen3-VL), "
        "as a reverse proxy in front of any OpenAI-compatible or native endpoint.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the caching proxy in front of --upstream")
    _add_settings(serve)
    migrate = commands.add_parser(
        "migrate", help="bring the database schema to the newest revision"
    )
    _add_settings(migrate, _STORE_SETTINGS)
    index = commands.add_parser("index", help="maintain the vector index of the semantic tier")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    rebuild = index_commands.add_parser(
        "rebuild", help="rebuild the embedder's index from the database (SQL is the truth)"
    )
    _add_settings(rebuild, _STORE_SETTINGS + _EMBEDDER_SETTINGS)
    stats = commands.add_parser(
        "stats", help="print hit rate and savings from the database's ledger (all replicas)"
    )
    _add_settings(stats, (*_STORE_SETTINGS, "pricing"))
    stats.add_argument(
        "--json", action="store_true", help="print the same JSON document as the admin /stats"
    )
    _add_warmup(commands.add_parser("warmup", help="fill the cache from historical chat logs"))
    demo = commands.add_parser(
        "demo", help="run a scripted workload against a built-in stand-in model and print a table"
    )
    demo.add_argument(
        "--latency", type=float, default=0.8, help="stand-in model's answer time in seconds"
    )
    demo.add_argument(
        "--linger",
        action="store_true",
        help="keep the demo's proxy and dashboard up after the workload (until Ctrl-C)",
    )
    return parser


def _add_warmup(warmup: argparse.ArgumentParser) -> None:
    warmup.description = (
        "Import logged chat exchanges (JSON Lines: --record files, OpenAI Batch-style lines or "
        "request/response pairs) into the cache, with vectors for the semantic tier. Safe to "
        "run beside `vlcache serve` on the same store, and to run again (adds what is missing)."
    )
    warmup.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="JSON Lines log; image file paths in it are relative to its directory",
    )
    warmup.add_argument(
        "--tenant", metavar="NAME", help="import into tenant NAME's namespace (as --tenant-header)"
    )
    warmup.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="import into the namespace of the API key held in environment variable VAR",
    )
    warmup.add_argument(
        "--batch", type=int, default=32, help="images per forward pass and entries per commit"
    )
    warmup.add_argument("--report-json", type=Path, metavar="PATH", help="also write the report")
    _add_settings(warmup, _WARMUP_SETTINGS)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``vlcache`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        _configure_logging("WARNING")
        try:
            raise SystemExit(asyncio.run(run_demo(latency=args.latency, linger=args.linger)))
        except KeyboardInterrupt:
            raise SystemExit(0) from None
    settings = _settings(args)
    # A report on stdout: start-up chatter (migrations, FAISS loading) only when asked for.
    quiet = args.command == "stats" and args.log_level is None
    _configure_logging("WARNING" if quiet else settings.log_level)
    if args.command == "serve":
        from .server import serve

        serve(settings)
    elif args.command == "migrate":
        from .server import migrate

        asyncio.run(migrate(settings))
    elif args.command == "stats":
        from .pricing import PricingError
        from .server import print_stats

        try:
            asyncio.run(print_stats(settings, as_json=args.json))
        except PricingError as exc:
            raise SystemExit(f"vlcache: {exc}") from None
    elif args.command == "warmup":
        from .warmup import command

        raise SystemExit(command(args, settings))
    elif args.command == "index":
        from .server import rebuild_index

        asyncio.run(rebuild_index(settings))
