"""The one declared table of settings.

Every setting is declared once, here, with its default and one line of help. That table drives
the CLI flags (``--upstream``), the environment variables (``VLCACHE_UPSTREAM``) and the README's
settings table (``tests/proxy/test_settings.py`` fails when the README and this table disagree).
Settings are built once at start-up and passed down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    max_images: int = Field(
        4, ge=1, description="Most images one request may carry and still be cached."
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024,
        gt=0,
        description="Largest single image (decoded or fetched) that is cached.",
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
    log_level: str = Field("INFO", description="Logging level: DEBUG, INFO, WARNING or ERROR.")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("upstream")
    @classmethod
    def _http_upstream(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("upstream must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in force: ``--db`` or SQLite inside the data directory."""
        if self.db:
            return self.db
        return f"sqlite+aiosqlite:///{self.data_dir / 'vlcache.db'}"


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
