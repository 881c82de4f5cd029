"""The container files, read (no Docker engine here): settings they pass are valid, the GPU is reserved."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from server.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def _env_file() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "docker" / "example.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_example_env_holds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = _env_file()
    ours = {name: value for name, value in pairs.items() if name.startswith(ENV_PREFIX)}
    assert ours, "example.env sets no DITCACHE_ variable"
    for name in ours:
        assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, f"{name} is not a setting"
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    # The compose file reserves a GPU for this service: the settings must put the models on it.
    assert settings.device and all(torch.device(device).type == "cuda" for device in settings.device)


def test_compose_reserves_a_gpu_and_keeps_models_in_a_volume() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["ditcache"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "models:/models" in service["volumes"] and "models" in compose["volumes"]
    assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_torch_first() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    assert 'VOLUME ["/models"]' in text and "DITCACHE_CACHE_DIR=/models" in text
    assert text.index('pip install "torch==') < text.index("pip install .")
    makefile = (ROOT / "Makefile").read_text()
    pinned = re.search(r"TORCH_VERSION \?= (\S+)", makefile)
    assert pinned and f"ARG TORCH_VERSION={pinned.group(1)}" in text
    assert text.rstrip().endswith('ENTRYPOINT ["ditcache", "serve"]')
