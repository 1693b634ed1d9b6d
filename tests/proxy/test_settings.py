"""One settings table drives flags, environment variables and the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from proxy.cli import _settings, build_parser
from proxy.settings import Settings, settings_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_generated_from_the_settings() -> None:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->", 1)[0]
    assert block == settings_markdown(), "regenerate the README table from proxy/settings.py"


def test_flags_override_environment_which_overrides_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLCACHE_PORT", "9000")
    monkeypatch.setenv("VLCACHE_UPSTREAM", "http://model:8000/")
    args = build_parser().parse_args(["serve", "--port", "9001", "--allow-private-image-urls"])
    settings = _settings(args)
    assert settings.port == 9001
    assert settings.upstream == "http://model:8000"
    assert settings.allow_private_image_urls is True
    assert Settings().port == 9000
    monkeypatch.delenv("VLCACHE_PORT")
    assert Settings().port == 8080


def test_settings_are_frozen_and_validated() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Settings(upstream="ftp://nope")
    with pytest.raises(ValidationError):
        Settings(log_level="LOUD")
    assert (
        Settings(db=None, data_dir=Path("/x")).database_url == "sqlite+aiosqlite:////x/vlcache.db"
    )
