"""Service settings from the environment (``STEER_*``, and ``REDIS_URL``), one object for all.

The gateway, the workers and ``steer serve`` read the same Settings, so a deployment sets
each value once (docker-compose passes the same env to api and worker).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ASSETS = Path(__file__).resolve().parents[1] / "assets"


class Settings(BaseSettings):
    """Everything configurable about the service; env vars are ``STEER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="STEER_", env_file=None, extra="ignore")

    # Where things are
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "STEER_REDIS_URL"),
        description="Redis server; unset: `steer serve` starts an embedded one")
    data_dir: Path = Field(Path("data"), description="Images and embedded-Redis data")
    pipeline_dir: Path = Field(REPO_ASSETS / "toy-pipeline", description="Local SD-1.x folder")
    bundle_dir: Path | None = Field(REPO_ASSETS / "toy-bundle",
                                    description="Steering bundle folder (None: no steering)")
    policy_file: Path | None = Field(None, description="Content-safety policy file (TOML or "
                                     "YAML, docs/serving.md); None: no policy")
    public_url: str = Field("", description="Base URL for links in responses and webhooks "
                            "(empty: links are relative to the request's own base URL)")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Without public_url, the Host headers whose requests are answered (links "
        "are built from the Host); others get 400, so a forged Host cannot be reflected into "
        "Location and links. \"*\" allows any")
    queue_name: str = "steer-generations"
    webhook_queue_name: str = "steer-webhooks"

    # Limits and validation
    max_prompt_chars: int = 1000
    max_steps: int = Field(150, ge=1, le=999, description="Most denoising steps a request may "
                           "ask for (DDIM on SD-1.x's 1000 training timesteps: at most 999)")
    min_size: int = 8
    max_size: int | None = Field(None, ge=8, description="Largest width/height (None: twice "
                                 "the pipeline's native side, e.g. 1024 for SD-1.x)")
    max_job_cost: int | None = Field(
        None, ge=1, description="Most pixel-steps (width × height × steps × n_images) one job "
        "may ask for (None: the native side² × 50 steps × 8 images)")
    max_n_images: int = 8
    max_batch_items: int = 100
    max_body_bytes: int = 256 * 1024
    max_queue_depth: int = Field(1000, description="Queued jobs before 503 + Retry-After")
    per_key_max_queued: int = Field(50, description="Queued+running jobs per API key (429)")
    rate_limit_per_minute: int = Field(120, description="Requests per key per minute (429)")

    # Auth and web
    auth_enabled: bool = Field(False, description="Require `Authorization: Bearer <key>`")
    cors_origins: list[str] = Field(default_factory=list)
    url_signing_secret: SecretStr = Field(
        SecretStr(""), description="HMAC key for image links (empty: random per data_dir)")
    image_url_ttl_s: int = 3600
    image_reserve_mb: int = Field(
        64, ge=0, description="Free space (MB) image writes leave on their disk: a job fails "
        "with a disk-full error before the queue's append-only file (embedded mode: same "
        "folder) runs out")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="HMAC key for webhook signatures (empty: random per data_dir)")
    log_prompts: bool = Field(False, description="Include prompts in logs")
    log_json: bool = True

    # Jobs and workers
    job_timeout_s: int = 600
    result_retention_s: int = Field(24 * 3600, description="Results and images kept this long")
    worker_heartbeat_s: float = Field(10.0, description="Worker/job heartbeat period")
    worker_heartbeat_ttl_s: int = Field(60, description="A worker silent this long is dead")
    maintenance_interval_s: int = Field(60, description="Registry cleanup / image sweep period")
    idempotency_ttl_s: int = 24 * 3600
    webhook_timeout_s: float = 10.0
    webhook_retries: int = 5
    webhook_allowed: list[str] = Field(
        default_factory=list, description="Networks (CIDR) or host names webhooks may reach "
        "although private or loopback, e.g. [\"10.1.0.0/16\", \"hooks.internal\"]; others "
        "must be public (SSRF guard)")
    wait_max_s: float = Field(60.0, description="Longest `Prefer: wait=N` honoured")
    wait_max_per_key: int = Field(
        10, ge=0, description="`Prefer: wait` requests one key may hold open at once per "
        "gateway process; past that they are answered at once (202), as without the header")
    redis_max_connections: int = Field(
        100, ge=4, description="Connections per Redis pool of a gateway process (sync and "
        "async); a request waits up to 5 s for a free one, then gets 503")

    @field_validator("policy_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """``STEER_POLICY_FILE=`` (empty) means no policy, not the current folder."""
        return None if value == "" else value

    @cached_property
    def images_dir(self) -> Path:
        """Folder holding every image as ``<uuid>.png`` (shared by API and workers)."""
        return self.data_dir / "images"
