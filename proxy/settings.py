"""The one declared table of settings.

Every setting is declared once, here, with its default and one line of help. That table drives
the CLI flags (``--upstream``), the environment variables (``VLCACHE_UPSTREAM``) and the README's
settings table (``tests/proxy/test_settings.py`` fails when the README and this table disagree).
Settings are built once at start-up and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EMBEDDERS = ("clip", "efficientnet-lite0", "none")


class Settings(BaseSettings):
    """Frozen, typed configuration of one vlcache process."""

    model_config = SettingsConfigDict(env_prefix="VLCACHE_", frozen=True, extra="forbid")

    upstream: str = Field(
        "http://127.0.0.1:8000",
        description="Base URL of the model endpoint; the request path is appended to it.",
    )
    host: str = Field("127.0.0.1", description="Address the proxy listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the proxy listens on.")
    data_dir: Path = Field(
        Path("./vlcache-data"),
        description="Directory for the embedded SQLite database and index snapshots.",
    )
    db: str | None = Field(
        None,
        description="SQLAlchemy URL of a shared database (postgresql+asyncpg://...); "
        "default: SQLite in the data directory.",
    )
    shared_namespace: str | None = Field(
        None,
        description="Let every caller share this one namespace instead of one per credential.",
    )
    tenant_header: str | None = Field(
        None,
        description="Trusted request header naming the tenant (its namespace); off unless set.",
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest JSON request body the proxy accepts (413 beyond it).",
    )
    body_read_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a client may take to send a chat request's body (408 beyond it).",
    )
    max_images: int = Field(
        4, ge=1, description="Most images one request may carry and still be cached."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024,
        gt=0,
        description="Largest single image (decoded or fetched) that is cached.",
    )
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="Largest width x height decoded for the semantic tier."
    )
    image_fetch_timeout: float = Field(
        10.0, gt=0, description="Seconds allowed to fetch an http(s) image URL for its hash."
    )
    allow_private_image_urls: bool = Field(
        False,
        description="Let image URLs reach loopback/private addresses (tests, trusted LANs only).",
    )
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to open a connection to the upstream (504 beyond it)."
    )
    read_timeout: float = Field(
        300.0, gt=0, description="Seconds the upstream may stay silent while answering (504)."
    )
    memory_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Bytes of recently used answers kept in memory in front of the database.",
    )
    flush_interval: float = Field(
        1.0, gt=0, description="Seconds between writes of buffered hit counters to the database."
    )
    embedder: str = Field(
        "clip",
        description="Image embedder of the semantic tier: clip, efficientnet-lite0 (offline) "
        "or none (exact tier only).",
    )
    clip_model: str = Field("ViT-B-32", description="open_clip architecture of the clip embedder.")
    clip_pretrained: str | None = Field(
        None,
        description="open_clip weights tag, or a local checkpoint path for air-gapped sites "
        "(default laion2b_s34b_b79k, fetched by open_clip on first start).",
    )
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cosine similarity every image must reach for a semantic hit "
        "(default: the embedder's own, 0.95 for clip).",
    )
    embed_precision: str = Field(
        "auto",
        description="Embedder precision: auto (fp32 on onnx; bf16 in torch where the CPU has "
        "it), fp32 or bf16.",
    )
    embed_runtime: str = Field(
        "auto",
        description="What runs the embedder: onnx (ONNX Runtime, the model exported once and "
        "cached in the data directory), torch, or auto (onnx unless --embed-precision bf16, or "
        "if it fails to load; else torch).",
    )
    embed_threads: int | None = Field(
        None,
        ge=1,
        description="Threads of the embedder, torch or ONNX Runtime (default: torch's choice).",
    )
    embed_batch: int = Field(
        16, ge=1, description="Most images embedded in one forward pass (micro-batching)."
    )
    embed_wait: float = Field(
        0.0,
        ge=0,
        description="Seconds a forward pass waits for more images to batch (images that queue "
        "while a pass runs are batched anyway).",
    )
    embed_queue: int = Field(
        64, ge=1, description="Images waiting to be embedded beyond which requests skip the tier."
    )
    embed_timeout: float = Field(
        2.0, gt=0, description="Seconds a request may spend embedding before it goes upstream."
    )
    index_approx_rows: int = Field(
        8192,
        ge=2,
        description="Entries of one question beyond which its index becomes approximate (HNSW).",
    )
    snapshot_interval: float = Field(
        300.0, gt=0, description="Seconds between index snapshots in the data directory."
    )
    ttl: float | None = Field(
        None,
        gt=0,
        description="Seconds an answer stays servable (default: until evicted); a request's "
        "X-Cache-TTL or the upstream's Cache-Control max-age can only shorten it.",
    )
    max_entries: int | None = Field(
        None, ge=1, description="Most live entries; beyond it the least recently hit are evicted."
    )
    max_bytes: int | None = Field(
        None,
        ge=1,
        description="Most bytes of live entries (answers, vectors, thumbnails); beyond it the "
        "least recently hit are evicted.",
    )
    maintenance_interval: float = Field(
        30.0,
        gt=0,
        description="Seconds between maintenance passes: expiry, eviction, vacuum.",
    )
    vacuum_after: float = Field(
        3600.0,
        gt=0,
        description="Seconds a deleted entry's row is kept (so every replica sees the deletion) "
        "before it is removed from the database.",
    )
    sync_interval: float = Field(
        0.5,
        gt=0,
        description="Seconds between look-ups of entries and deletions made by other processes "
        "(warm-up, other replicas), which the index then follows.",
    )
    coalesce_across_processes: bool | None = Field(
        None,
        description="Let identical misses arriving at different processes on one database wait "
        "for a single upstream call (claim rows with a lease); default: on with PostgreSQL.",
    )
    claim_lease: float = Field(
        10.0,
        gt=0,
        description="Seconds a cross-process claim lasts unless its holder renews it; followers "
        "of a holder that died ask the upstream themselves after at most this long.",
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Address of the admin listener (metrics, stats, dashboard, entries); "
        "anything but loopback requires --admin-token.",
    )
    admin_port: int = Field(8081, ge=0, le=65535, description="Port of the admin listener.")
    admin_token: str | None = Field(
        None,
        description="Bearer token the admin listener requires (Authorization: Bearer ...); "
        "/healthz and /readyz stay open.",
    )
    pricing: Path | None = Field(
        None,
        description="TOML price table (per model, per 1M input and output tokens) that turns "
        "saved tokens into saved cost; without it tokens and time are still counted.",
    )
    record: Path | None = Field(
        None,
        description="Append one JSON line per completed chat exchange to this file (the "
        "warm-up format; credentials are never written).",
    )
    record_max_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="Size at which the --record file is rotated."
    )
    record_backups: int = Field(
        5, ge=1, description="Rotated --record files kept (PATH.1 is the newest)."
    )
    log_level: str = Field("INFO", description="Logging level: DEBUG, INFO, WARNING or ERROR.")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, value: str) -> str:
        if value not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}")
        return value

    @field_validator("embed_precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in ("auto", "fp32", "bf16"):
            raise ValueError("precision must be auto, fp32 or bf16")
        return value

    @field_validator("embed_runtime")
    @classmethod
    def _known_runtime(cls, value: str) -> str:
        if value not in ("auto", "onnx", "torch"):
            raise ValueError("runtime must be auto, onnx or torch")
        return value

    @field_validator("upstream")
    @classmethod
    def _http_upstream(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _admin_token_off_loopback(self) -> Settings:
        if not self.admin_is_loopback and not self.admin_token:
            raise ValueError(
                f"the admin listener on {self.admin_host} is reachable from other machines: "
                "set --admin-token (or VLCACHE_ADMIN_TOKEN), or bind it to 127.0.0.1"
            )
        return self

    @property
    def admin_is_loopback(self) -> bool:
        """True when the admin listener is reachable from this machine only."""
        return is_loopback(self.admin_host)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in force: ``--db`` or SQLite inside the data directory."""
        if self.db:
            return self.db
        return f"sqlite+aiosqlite:///{self.data_dir / 'vlcache.db'}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_markdown() -> str:
    """The README's settings table, generated from this module."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for flag, env, default, help_text in describe_settings():
        shown = "" if default is None else f"`{default}`"
        lines.append(f"| `{flag}` | `{env}` | {shown} | {help_text} |")
    return "\n".join(lines)


def describe_settings() -> list[tuple[str, str, Any, str]]:
    """Rows of (flag, environment variable, default, help) for ``--help`` and the README."""
    rows = []
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "VLCACHE_" + name.upper()
        rows.append((flag, env, field.default, field.description or ""))
    return rows
