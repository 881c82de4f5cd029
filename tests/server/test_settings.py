"""Settings: flags over environment over config file over defaults; the CLI's flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.builtin_models import BUILTIN_MODEL_NAMES
from server.cli import _parser, settings_from_args
from server.settings import DEFAULT_MODELS, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DITCACHE_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_builtin_models_on_cpu() -> None:
    settings = load_settings()
    assert tuple(settings.models) == DEFAULT_MODELS == BUILTIN_MODEL_NAMES
    assert (settings.device, settings.dtype, settings.host, settings.port) == (
        "cpu",
        "float32",
        "127.0.0.1",
        8000,
    )
    assert settings.install_cache_hooks


def test_priority_flags_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ditcache.toml"
    config.write_text('models = ["tiny-flux"]\nport = 9000\ndevice = "cuda"\ndtype = "bfloat16"\n')
    monkeypatch.setenv("DITCACHE_PORT", "9100")
    monkeypatch.setenv("DITCACHE_DTYPE", "float16")
    settings = load_settings(config, dtype="float32")
    assert settings.models == ["tiny-flux"]  # file
    assert settings.device == "cuda"  # file
    assert settings.port == 9100  # env over file
    assert settings.dtype == "float32"  # flag over env


def test_config_file_from_env_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ditcache.json"
    config.write_text(json.dumps({"models": ["a/b"], "queue_size": 3}))
    monkeypatch.setenv("DITCACHE_CONFIG", str(config))
    settings = load_settings()
    assert (settings.models, settings.queue_size) == (["a/b"], 3)


def test_models_from_env_as_list_or_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITCACHE_MODELS", "tiny-wan, org/model")
    assert load_settings().models == ["tiny-wan", "org/model"]
    monkeypatch.setenv("DITCACHE_MODELS", '["tiny-flux"]')
    assert load_settings().models == ["tiny-flux"]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(dtype="float8")
    with pytest.raises(ValidationError):
        load_settings(unknown_setting=1)
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.toml")
    (tmp_path / "settings.yaml").write_text("port: 1\n")
    with pytest.raises(ValueError, match=r"toml or \.json"):
        load_settings(tmp_path / "settings.yaml")


def test_cli_flags_become_settings() -> None:
    args = _parser().parse_args(
        [
            "serve",
            "--model",
            "black-forest-labs/FLUX.1-dev",
            "--model",
            "tiny-wan",
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--port",
            "8080",
            "--no-cache-hooks",
        ]
    )
    settings = settings_from_args(args)
    assert settings.models == ["black-forest-labs/FLUX.1-dev", "tiny-wan"]
    assert (settings.device, settings.dtype, settings.port) == ("cuda", "bfloat16", 8080)
    assert settings.install_cache_hooks is False
    # Flags left out leave the defaults (or the environment) alone.
    assert settings_from_args(_parser().parse_args(["serve"])).models == list(DEFAULT_MODELS)
