"""Server settings: command-line flags over ``DITCACHE_*`` environment variables over a config file.

The config file (TOML or JSON, chosen by its suffix) is named by ``--config`` or ``DITCACHE_CONFIG``
and uses the field names below as keys. Lists in the environment are JSON or comma-separated
(``DITCACHE_MODELS=tiny-flux,tiny-wan``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "DITCACHE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# Kept equal to server.models.BUILTIN_MODEL_NAMES (a test checks it); spelled out here so that reading
# the settings does not import diffusers.
DEFAULT_MODELS = ("tiny-flux", "tiny-wan")

Dtype = Literal["float32", "float16", "bfloat16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        min_length=1,
        description="models kept resident: built-in names, hub ids or local folders",
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    dtype: Dtype = "float32"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cache_dir: Path = Field(
        default=Path(".ditcache"), description="where downloaded and built models are kept"
    )
    install_cache_hooks: bool = Field(
        default=True, description="false: serve the plain pipelines, accepting only cache method 'none'"
    )
    queue_size: int = Field(default=16, ge=1, le=10_000, description="requests waiting per model")
    job_ttl_s: float = Field(default=3600.0, gt=0, description="how long a finished job's result is kept")
    max_finished_jobs: int = Field(default=256, ge=1, description="finished jobs kept, oldest dropped first")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        if settings_cls.model_config.get("json_file"):
            sources.append(JsonConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from ``overrides`` (flags), then the environment, then ``config_file``, then defaults."""
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is None:
        return Settings(**overrides)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    suffix = config_file.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ValueError(f"config file must be .toml or .json, got {config_file.name}")
    file_config = (
        SettingsConfigDict(toml_file=config_file)
        if suffix == ".toml"
        else SettingsConfigDict(json_file=config_file)
    )

    class FileSettings(Settings):
        # Merged by pydantic with the parent's configuration.
        model_config = file_config

    return FileSettings(**overrides)
