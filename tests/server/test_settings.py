"""Settings: flags over environment over config file over defaults; the CLI's flags."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server.cli import _NO_FLAG, _parser, settings_from_args
from server.models.builtin import BUILTIN_MODEL_NAMES
from server.settings import DEFAULT_MODELS, Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DITCACHE_"):
            monkeypatch.delenv(name)


def test_defaults_serve_the_builtin_models_on_cpu() -> None:
    settings = load_settings()
    assert tuple(settings.models) == DEFAULT_MODELS == BUILTIN_MODEL_NAMES
    # Out of the box: no GPU needed (and full precision, which CPUs run fastest), reachable from this
    # host only, at the address the README's examples use.
    assert [torch.device(device).type for device in settings.device] == ["cpu"] and settings.replicas == 1
    assert settings.dtype == "float32"
    assert ipaddress.ip_address(settings.host).is_loopback
    assert f"localhost:{settings.port}/v1/" in (Path(__file__).parents[2] / "README.md").read_text()
    assert settings.install_cache_hooks


def test_priority_flags_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ditcache.toml"
    config.write_text('models = ["tiny-flux"]\nport = 9000\ndevice = "cuda"\ndtype = "bfloat16"\n')
    monkeypatch.setenv("DITCACHE_PORT", "9100")
    monkeypatch.setenv("DITCACHE_DTYPE", "float16")
    settings = load_settings(config, dtype="float32")
    assert settings.models == ["tiny-flux"]  # file
    assert settings.device == ["cuda"]  # file
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


def test_cli_flags_become_settings(tmp_path: Path) -> None:
    args = _parser().parse_args(
        [
            "serve",
            "--model", "black-forest-labs/FLUX.1-dev", "--model", "tiny-wan",
            "--device", "cuda", "--device", "cuda:1", "--replicas", "2",
            "--dtype", "bfloat16",
            "--host", "0.0.0.0",
            "--port", "8080",
            "--cache-dir", str(tmp_path),
            "--no-cache-hooks",
            "--queue-size", "3",
            "--job-ttl-s", "5.5",
            "--max-finished-jobs", "7",
            "--torch-threads", "2",
            "--log-level", "debug",
            "--log-format", "text",
            "--max-body-bytes", "4096",
            "--request-timeout-s", "9",
            "--cors-origin", "https://a.example", "--cors-origin", "https://b.example",
            "--shutdown-grace-s", "1.5",
        ]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.models == ["black-forest-labs/FLUX.1-dev", "tiny-wan"]
    assert (settings.device, settings.replicas) == (["cuda", "cuda:1"], 2)
    assert (settings.device, settings.dtype, settings.host, settings.port) == (
        ["cuda", "cuda:1"],
        "bfloat16",
        "0.0.0.0",
        8080,
    )
    assert settings.cache_dir == tmp_path
    assert settings.install_cache_hooks is False
    assert (settings.queue_size, settings.job_ttl_s, settings.max_finished_jobs) == (3, 5.5, 7)
    assert (settings.torch_threads, settings.log_level, settings.log_format) == (2, "debug", "text")
    assert (settings.max_body_bytes, settings.request_timeout_s, settings.shutdown_grace_s) == (
        4096,
        9.0,
        1.5,
    )
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    # Flags left out leave the defaults (or the environment) alone.
    assert settings_from_args(_parser().parse_args(["serve"])).models == list(DEFAULT_MODELS)


def _serve(*flags: str) -> Settings:
    return settings_from_args(_parser().parse_args(["serve", *flags]))


def test_replicas_means_the_copies_that_serve_on_either_backend() -> None:
    local = _serve("--replicas", "2")
    assert (local.backend, local.replicas) == ("local", 2)
    ray = _serve("--backend", "ray", "--replicas", "3")
    assert ray.ray_replica_range == (3, 3)
    autoscaled = _serve("--backend", "ray", "--ray-min-replicas", "1", "--ray-max-replicas", "4")
    assert autoscaled.ray_replica_range == (1, 4)
    assert _serve("--backend", "ray").ray_replica_range == (1, 1)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--ray-max-replicas", "2"], "ray_max_replicas"),
        (["--backend", "local", "--ray-num-gpus", "1"], "ray_num_gpus"),
        (["--backend", "ray", "--replicas", "2", "--ray-max-replicas", "4"], "not both"),
        (["--backend", "ray", "--ray-min-replicas", "3", "--ray-max-replicas", "2"], "at least"),
        (["--batch-wait-ms", "5"], "batch_wait_ms"),
        (["--max-batch", "4", "--compile"], "compile"),
    ],
)
def test_a_combination_that_means_nothing_is_refused_at_start(flags: list[str], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        _serve(*flags)


def test_cli_values_are_checked_against_the_setting() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--dtype", "float8"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--port", "http"])
    with pytest.raises(ValidationError):
        settings_from_args(_parser().parse_args(["serve", "--queue-size", "0"]))


def test_cli_help_says_what_the_settings_say(capsys: pytest.CaptureFixture[str]) -> None:
    """Each flag's help carries its setting's description and default, so the two cannot disagree."""
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    # Unwrapped, since argparse breaks lines wherever they are long.
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {', '.join(DEFAULT_MODELS)})" in text
    for name, field in Settings.model_fields.items():
        if field.description and name not in _NO_FLAG:
            assert " ".join(field.description.split()) in text, name
    defaults = Settings()
    assert f"(default: {defaults.port})" in text and f"(default: {defaults.dtype})" in text
    # A key on the command line would show in the process list.
    assert "--api-key" not in text
