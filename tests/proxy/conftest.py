"""Fixtures of the proxy tests beyond the project-wide ones in ``tests/conftest.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.proxy.hostile import Pictures


@pytest.fixture
async def pictures(aiohttp_server: Any) -> AsyncIterator[Pictures]:
    pictures = Pictures()
    pictures.server = await aiohttp_server(pictures.app())
    yield pictures
    pictures.release.set()
