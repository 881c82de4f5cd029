"""``ditcache serve``: flags over ``DITCACHE_*`` variables over a config file (see settings.py)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .settings import Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the resident models over HTTP")
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="a built-in name, a hub id or a local folder; repeat to keep several resident "
        "(default: tiny-flux and tiny-wan)",
    )
    serve.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    serve.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="(default: float32)")
    serve.add_argument("--host", help="(default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="(default: 8000)")
    serve.add_argument("--config", type=Path, help="a .toml or .json file of settings")
    serve.add_argument("--cache-dir", type=Path, help="where built and downloaded models are kept")
    serve.add_argument(
        "--no-cache-hooks",
        dest="install_cache_hooks",
        action="store_const",
        const=False,
        help="serve the plain pipelines; only cache method 'none' is accepted",
    )
    serve.add_argument("--queue-size", type=int, help="requests waiting per model (default: 16)")
    serve.add_argument("--job-ttl-s", type=float, help="seconds a finished job is kept (default: 3600)")
    serve.add_argument("--max-finished-jobs", type=int, help="finished jobs kept (default: 256)")
    serve.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--log-format", choices=["json", "text"], help="(default: json)")
    serve.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default: 1 MiB)")
    serve.add_argument("--request-timeout-s", type=float, help="the longest a request may run (default: 600)")
    serve.add_argument(
        "--shutdown-grace-s", type=float, help="on SIGTERM, time for running work to finish (default: 30)"
    )
    serve.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        help="allow this origin by CORS; repeat for several (default: no CORS)",
    )
    # No --api-key flag: a key on the command line shows in the process list. Use DITCACHE_API_KEY.
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name not in ("command", "config") and value is not None
    }
    return load_settings(args.config, **flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"ditcache: invalid settings: {exc}", file=sys.stderr)
        return 2
    from . import logs
    from .app import create_app
    from .serving import serve

    logs.configure(settings.log_level, settings.log_format)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with this handler in place,
    # that ends nothing, and a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
