"""The service's runtime settings: one pydantic-settings class, read once at start-up.

Every field is an environment variable with the ``SESSIONREC_`` prefix (``SESSIONREC_REDIS_URL``,
``SESSIONREC_MAX_BATCH`` …); the README has the table. The app builds its ``Settings`` in the
lifespan (or takes one from the caller, as tests do) and passes it down; nothing reads the
environment at import time.

The model's architecture is *not* here: it travels inside the artifact. The one runtime number
tied to it is ``log_sessions``: a cache rebuilt from the raw log is exact only when the log holds
the model's whole receptive field (``n_layers · window`` sessions) plus one older session, whose
end time gives the oldest session's time gap. Loading a model that needs more is refused.
"""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Device(enum.StrEnum):
    AUTO = "auto"  # CUDA when torch sees it, else CPU
    CPU = "cpu"
    CUDA = "cuda"


class KVStorage(enum.StrEnum):
    FLOAT32 = "float32"  # exact: cached path equals a full recompute within 1e-4
    FLOAT16 = "float16"  # half the Redis bytes; top-k overlap ≥ 0.98 (tested)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SESSIONREC_", extra="forbid", frozen=True)

    # --- state store
    redis_url: str | None = Field(
        None, description="Redis URL; unset = start an embedded redis-server under data_dir"
    )
    redis_cluster: bool = Field(False, description="redis_url points at a Redis Cluster")
    redis_timeout_ms: float = Field(
        100.0, gt=0, le=60_000, description="per-call deadline; past it answers are `degraded`"
    )
    redis_pool_size: int = Field(64, ge=1, le=10_000, description="max Redis connections")
    data_dir: Path = Field(Path("runs/serve"), description="embedded Redis data (AOF) lives here")
    ttl_seconds: int = Field(
        30 * 86_400, ge=0, description="per-user state expires after this idle time; 0 = never"
    )
    log_sessions: int = Field(
        129, ge=2, le=10_000, description="sessions kept in each user's raw log (≥ L·W + 1)"
    )
    kv_storage: KVStorage = Field(KVStorage.FLOAT32, description="dtype of K/V bytes in Redis")

    # --- model
    registry: Path = Field(Path("artifacts"), description="model registry directory")
    model_ref: str = Field("current", description="version to serve: current, latest, a name")
    device: Device = Field(Device.AUTO, description="torch device for the model step")
    torch_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="torch intra-op threads on CPU; 0 = torch's default (all cores). One "
        "keeps a core for the event loop: the step is small and batched",
    )

    # --- micro-batching
    max_batch: int = Field(64, ge=1, le=1024, description="recommendations per model step")
    max_wait_ms: float = Field(2.0, ge=0, le=1_000, description="how long a batch may wait to fill")
    max_queue: int = Field(
        4096, ge=1, description="queued recommendations beyond which requests get 503"
    )
    max_inflight_batches: int = Field(
        4, ge=1, le=64, description="batches between Redis and the model at once"
    )
    request_timeout_ms: float = Field(
        2_000.0, gt=0, description="deadline of one recommendation, queueing included"
    )

    # --- HTTP
    admin_token: SecretStr | None = Field(
        None, description="bearer token for /admin/*; unset = admin endpoints disabled"
    )
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="larger request bodies get 413")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    otel: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (traces, metrics, logs to the global "
        "providers); off: the service's metrics are Prometheus, and it costs per request",
    )

    @field_validator("admin_token", "redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # `SESSIONREC_ADMIN_TOKEN=` (set but empty, as compose passes an unset variable) means
        # "not configured", never "the empty token".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("redis_cluster=true needs redis_url (the embedded Redis is one node)")
        return self
