"""``ditcache serve``: flags over ``DITCACHE_*`` variables over a config file (see settings.py)."""

from __future__ import annotations

import argparse
import signal
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from server.settings import Settings, load_settings

# Settings with no flag. A key on the command line shows in the process list (use DITCACHE_API_KEY);
# per-model limits are nested (environment or config file); retry_after_s never had one.
_NO_FLAG = frozenset({"api_key", "api_keys", "admin_key", "model_limits", "retry_after_s"})
# Flags not spelled like their field: a list takes one item per (repeated) flag, and the hooks and the
# shipped adapters, on by default, can only be turned off.
_FLAG_NAMES = {
    "models": "--model",
    "cors_origins": "--cors-origin",
    "loras": "--lora",
    "install_cache_hooks": "--no-cache-hooks",
    "builtin_loras": "--no-builtin-loras",
}
_METAVARS = {"models": "SPEC", "cors_origins": "ORIGIN", "device": "DEVICE", "loras": "MODEL:NAME=SOURCE"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the resident models over HTTP")
    serve.add_argument("--config", type=Path, help="a .toml or .json file of settings")
    for name, field in Settings.model_fields.items():
        if name not in _NO_FLAG:
            _add_flag(serve, name, field)
    from server.policy.calibrate import add_arguments

    add_arguments(commands.add_parser("calibrate", help="measure speed against fidelity for target requests"))
    return parser


def _add_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    """A flag for setting ``name``; its type, choices and help come from the field, so they cannot drift.

    Flags default to None, not to the setting's default, so that a flag left out leaves the
    environment and the config file in charge.
    """
    flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    kind = _without_none(field.annotation)
    default = field.get_default(call_default_factory=True)
    options: dict[str, Any] = {"dest": name, "help": _help(name, field, default)}
    if kind is bool:
        options.update(action="store_const", const=not default)
    elif get_origin(kind) is list:
        options.update(action="append", metavar=_METAVARS.get(name))
    elif get_origin(kind) is Literal:
        options["choices"] = list(get_args(kind))
    elif kind in (int, float, Path):
        options["type"] = kind
    elif kind is not str:
        raise TypeError(f"setting {name!r} ({kind}) has no flag form; give it one or add it to _NO_FLAG")
    parser.add_argument(flag, **options)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        (kind,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kind
    return annotation


def _help(name: str, field: FieldInfo, default: Any) -> str:
    text = field.description or ""
    if isinstance(default, bool):
        # The flag can only ask for the opposite of the default, which the description may explain.
        value = "true" if not default else "false"
        if not text.startswith(f"{value}:"):
            text = f"{value}: {text}" if text else value
        text = f"sets {name} to {text}"
    elif default is not None:
        text += f" (default: {_shown(default)})"
    # argparse formats help with %, so a literal one must be doubled.
    return text.strip().replace("%", "%%")


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_from_args(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name not in ("command", "config") and value is not None
    }
    return load_settings(args.config, **flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "calibrate":
        from server.policy.calibrate import run

        return run(args)
    try:
        settings = settings_from_args(args)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"ditcache: invalid settings: {exc}", file=sys.stderr)
        return 2
    from server import logs
    from server.api.app import create_app
    from server.api.serving import serve

    logs.configure(settings.log_level, settings.log_format)
    if settings.backend == "ray":
        from server import ray_backend

        ray_backend.start(settings, blocking=True)
        return 0
    # uvicorn re-raises the SIGTERM it handled once it has shut down; with this handler in place,
    # that ends nothing, and a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    serve(create_app(settings), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
