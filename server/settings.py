"""Server settings: command-line flags over ``DITCACHE_*`` environment variables over a config file.

The config file (TOML or JSON, chosen by its suffix) is named by ``--config`` or ``DITCACHE_CONFIG``
and uses the field names below as keys. Lists in the environment are JSON or comma-separated
(``DITCACHE_MODELS=tiny-flux,tiny-wan``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
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
# Kept equal to server.models.builtin.BUILTIN_MODEL_NAMES (a test checks it); spelled out here so that reading
# the settings does not import diffusers.
DEFAULT_MODELS = ("shapes-flux", "tiny-flux", "tiny-wan")

Dtype = Literal["float32", "float16", "bfloat16"]


class LimitOverrides(BaseModel):
    """Per-model replacements for the limits a model declares (``server.models.limits.ModelLimits``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_width: int | None = Field(default=None, ge=1)
    max_height: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    max_frames: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_n: int | None = Field(default=None, ge=1)
    max_prompt_chars: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_MODELS),
        min_length=1,
        description="models kept resident: built-in names, hub ids or local folders",
    )
    device: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        description="torch devices, each holding every model's replicas, e.g. cpu, cuda, cuda:1",
    )
    replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="copies of each model serving, each with its own worker: per device in one process "
        "(local), or Ray Serve replicas, a fixed number (ray; ray_min_replicas and ray_max_replicas "
        "autoscale instead)",
    )
    dtype: Dtype = "float32"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cache_dir: Path = Field(
        default=Path(".ditcache"), description="where downloaded and built models are kept"
    )
    install_cache_hooks: bool = Field(
        default=True, description="false: serve the plain pipelines, accepting only cache method 'none'"
    )
    compile: bool = Field(
        default=False,
        description="true: compile each transformer's repeated blocks (torch.compile, regional) and warm "
        "them up at two sizes before the server is ready",
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        default="none",
        description="quantize the transformers' linear weights with torchao (fp8 needs a GPU that has it)",
    )
    attention_backend: str | None = Field(
        default=None,
        description="diffusers attention backend (native, flash, sage, ...), checked at start-up",
    )
    max_batch: int = Field(
        default=1,
        ge=1,
        le=64,
        description="generations a model copy runs at once; their transformer forwards are merged into "
        "batched ones, each request keeping its own cache policy (1: one at a time)",
    )
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="with max_batch above 1, how long a forward waits for requests taken from the queue "
        "that have not started denoising (0: merge whoever is ready)",
    )
    queue_size: int = Field(default=16, ge=1, le=10_000, description="requests waiting per model")
    loras: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters kept resident, each MODEL:NAME=SOURCE (a file, a folder or a hub id), "
        "chosen per request by name",
    )
    builtin_loras: bool = Field(
        default=True,
        description="false: leave out the adapters that ship beside an embedded model (shapes-flux's "
        "'outline'); they are left out anyway under compile, which serves no adapters",
    )
    max_loras_per_request: int = Field(default=4, ge=1, le=32, description="adapters one request may name")
    max_loras: int = Field(
        default=16, ge=0, le=1024, description="adapters a model may hold, all sources together"
    )
    lora_fold_mb: float = Field(
        default=64.0,
        ge=0,
        description="what one request running alone may fold its adapters into, in MiB: a private copy of "
        "each weight they touch, with their update added, runs one product per step instead of the shared "
        "weight's and the update's; past it, and in merged forwards, the update is added (0: never fold)",
    )
    lora_dir: Path | None = Field(
        default=None,
        description="where the admin endpoints may read adapters from: a source is a path under it",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="when set, /v1/admin routes (adding and removing adapters while serving) answer to "
        "'Authorization: Bearer <key>'; unset, they do not exist",
    )
    result_cache_mb: float = Field(
        default=64.0,
        ge=0,
        description='whole results kept for requests with "reuse": "exact", in MiB; an identical request '
        "is answered with the same bytes (0: keep none)",
    )
    text_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description="prompt embeddings kept across requests, per model copy, in MiB; a repeated prompt "
        "(the empty negative one, say) skips its text encoders, to the same bytes (0: keep none)",
    )
    trajectory_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description='intermediate latents kept for requests with "reuse": {"similar": ...}, per model copy, '
        "in MiB, in host memory; a similar later prompt starts from them (0: keep none)",
    )
    job_ttl_s: float = Field(default=3600.0, gt=0, description="how long a finished job's result is kept")
    max_finished_jobs: int = Field(default=256, ge=1, description="finished jobs kept, oldest dropped first")
    job_store: str | None = Field(
        default=None,
        description="where jobs live, shared by every replica: sqlite:PATH or redis://HOST:PORT/DB "
        "(default: sqlite in cache_dir/jobs.sqlite)",
    )
    job_owner_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a server silent this long in the job store is taken for dead; its jobs run again elsewhere",
    )
    backend: Literal["local", "ray"] = Field(
        default="local", description="local: one process, uvicorn; ray: a Ray Serve application"
    )
    ray_address: str | None = Field(
        default=None, description="the Ray cluster to join, e.g. auto (default: start one in this process)"
    )
    ray_min_replicas: int = Field(default=1, ge=1, description="Ray Serve: fewest replicas of the deployment")
    ray_max_replicas: int = Field(default=1, ge=1, description="Ray Serve: most replicas, reached under load")
    ray_target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ray Serve autoscaling: ongoing requests per replica to aim for"
    )
    ray_num_gpus: float = Field(default=0.0, ge=0, description="Ray Serve: GPUs each replica needs")
    ray_num_cpus: float = Field(default=1.0, ge=0, description="Ray Serve: CPUs each replica needs")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (default: torch's)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line, with the request id"
    )
    model_limits: dict[str, LimitOverrides] = Field(
        default_factory=dict,
        description='per model name: limits replacing the model\'s own, e.g. {"tiny-flux": {"max_steps": 8}}',
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="larger bodies are refused (413)")
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="the longest a request may run; X-Request-Timeout may ask for less"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with a 429 (queue full)")
    api_key: SecretStr | None = Field(
        default=None, description="when set, /v1 routes need 'Authorization: Bearer <key>'"
    )
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='tenants by name, each with its own key, e.g. {"team-a": "..."} (with or without '
        "api_key): /v1 routes take any of them, and what one tenant's requests leave behind (kept prompt "
        "embeddings, results, trajectories, jobs) is never seen by another's",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS; empty: no CORS headers at all"
    )
    # Named for turning it off, so that the flag derived from it reads --disable-playground.
    disable_playground: bool = Field(default=False, description="true: no playground page at /playground")
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM, how long running jobs may finish before they are cancelled",
    )

    @model_validator(mode="after")
    def _replica_bounds(self) -> Settings:
        given = self.model_fields_set
        if self.backend == "local":
            meaningless = sorted(name for name in given if name.startswith("ray_"))
            if meaningless:
                raise ValueError(
                    f"{', '.join(meaningless)}: only with backend 'ray' (the backend is 'local')"
                )
        elif "replicas" in given and given & {"ray_min_replicas", "ray_max_replicas"}:
            raise ValueError(
                "replicas (a fixed number of Ray Serve replicas) or ray_min_replicas and ray_max_replicas "
                "(an autoscaled range): not both"
            )
        if self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError("ray_max_replicas must be at least ray_min_replicas")
        if "batch_wait_ms" in given and self.max_batch == 1:
            raise ValueError("batch_wait_ms: only with max_batch above 1 (nothing is merged at 1)")
        if self.max_batch > 1 and self.compile:
            # A compiled block would be compiled again for every batch size a merged forward brings.
            raise ValueError("max_batch above 1 and compile do not go together yet: merge uncompiled")
        keys = [secret.get_secret_value() for secret in self.api_keys.values()]
        if self.api_key is not None:
            keys.append(self.api_key.get_secret_value())
        if any(not key for key in keys) or len(set(keys)) != len(keys):
            raise ValueError("api_key and api_keys: each key is non-empty and belongs to one tenant")
        if any(not name for name in self.api_keys):
            raise ValueError("api_keys: a tenant's name is non-empty")
        return self

    @property
    def tenant_keys(self) -> dict[str, SecretStr]:
        """Each tenant's key: ``api_keys``, and ``api_key`` as the tenant named ""."""
        keys = dict(self.api_keys)
        if self.api_key is not None:
            keys[""] = self.api_key
        return keys

    @property
    def ray_replica_range(self) -> tuple[int, int]:
        """The fewest and most Ray Serve replicas: ``replicas`` when given, else the autoscaled range."""
        if "replicas" in self.model_fields_set:
            return self.replicas, self.replicas
        return self.ray_min_replicas, self.ray_max_replicas

    @field_validator("loras")
    @classmethod
    def _lora_specs(cls, value: list[str]) -> list[str]:
        for spec in value:
            model, _, rest = spec.partition(":")
            name, _, source = rest.partition("=")
            if not (model and name and source):
                raise ValueError(f"a LoRA is MODEL:NAME=SOURCE, got {spec!r}")
        return value

    @field_validator("models", "cors_origins", "device", "loras", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
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
