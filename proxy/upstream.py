"""``Upstream``: the model endpoint behind the proxy, reached through one pooled session.

Requests go out with the client's method, path, query, headers (minus hop-by-hop ones) and
original body bytes; responses come back byte for byte (the session never decompresses, so
``Content-Encoding`` and ``Content-Length`` stay true). aiohttp errors are translated here into the
proxy's own 502 / 504 errors.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
# aiohttp writes a bytes body in one go, holding up the loop while a large one is copied into the
# transport (it warns past 1 MiB); a BytesIO body goes out piece by piece, under flow control.
_PIECEWISE_BODY_BYTES = 1 << 20


def create_upstream_session(
    *, connect_timeout: float, read_timeout: float
) -> aiohttp.ClientSession:
    """The pooled session to the upstream: no decompression, no invented headers."""
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=connect_timeout, sock_read=read_timeout
    )
    connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
    )


def forwardable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Request headers minus hop-by-hop, ``Host`` and ``Content-Length``."""
    connection_tokens = {
        t.strip().lower() for t in headers.get("Connection", "").split(",") if t.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in _REQUEST_DROP and lowered not in connection_tokens:
            out.add(name, value)
    return out


def relayable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Response headers to hand back to the client (hop-by-hop ones removed)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


class Upstream:
    """The model endpoint: a base URL and a session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = URL(base_url)

    def target(self, rel_url: URL) -> URL:
        """The upstream URL for a request path + query (the base URL's path is a prefix)."""
        path = self._base.path.rstrip("/") + rel_url.path
        return self._base.with_path(path, encoded=False).with_query(rel_url.query)

    @asynccontextmanager
    async def open(
        self, method: str, rel_url: URL, headers: CIMultiDict[str], data: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; yields the response once its headers arrived."""
        if isinstance(data, bytes) and len(data) > _PIECEWISE_BODY_BYTES:
            data = io.BytesIO(data)
        try:
            async with self._session.request(
                method, self.target(rel_url), headers=headers, data=data, allow_redirects=False
            ) as response:
                yield response
        except TimeoutError as exc:
            raise UpstreamTimeout("the upstream model did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"the upstream model could not be reached: {exc}") from exc

    async def relay(
        self,
        request: web.Request,
        response: aiohttp.ClientResponse,
        extra_headers: Mapping[str, str],
        on_chunk: Callable[[bytes], None] | None = None,
        *,
        for_others: Callable[[], bool] | None = None,
    ) -> Relayed:
        """Stream ``response`` to the client chunk by chunk, as it arrives (no buffering).

        ``on_chunk`` sees every chunk after it was written. When the client goes away, the rest
        is still read (for ``on_chunk`` alone) while ``for_others()`` says someone else follows
        the stream. ``complete`` is False when the upstream broke off, or the client went away
        before the end with no one else following.
        """
        out = web.StreamResponse(status=response.status, reason=response.reason)
        out.headers.extend(relayable(response.headers))
        out.headers.update(extra_headers)
        await out.prepare(request)
        delivering = True
        try:
            async for chunk in response.content.iter_any():
                if delivering and not await _deliver(out, chunk):
                    if for_others is None or not for_others():
                        return Relayed(out, complete=False)
                    delivering = False
                if on_chunk is not None:
                    on_chunk(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are out: the only honest signal left is to cut the client's connection
            # too, so it never mistakes a truncated body for a complete one.
            log.warning("upstream broke off mid-response: %s", exc or type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return Relayed(out, complete=False)
        return Relayed(out, complete=not delivering or await _deliver(out, None))


@dataclass(frozen=True, slots=True)
class Relayed:
    """A response relayed to the client, and whether all of it got through."""

    response: web.StreamResponse
    complete: bool


async def _deliver(out: web.StreamResponse, chunk: bytes | None) -> bool:
    """Write ``chunk`` (None: the end) to the client; False when the client has gone away.

    Kept apart from reading the upstream: aiohttp's error for a departed client is a
    ``ClientError`` too, and must not be mistaken for the upstream breaking off.
    """
    try:
        if chunk is None:
            await out.write_eof()
        else:
            await out.write(chunk)
    except ConnectionResetError:
        log.info("client went away mid-response")
        return False
    return True
