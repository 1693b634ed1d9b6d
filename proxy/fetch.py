"""``ImageFetcher``: fetch an http(s) image URL for its hash, under strict limits.

The cache must know the bytes behind an image URL to key it, but a URL chosen by a caller must
never make the proxy reach into its own network (SSRF). So every address a host name resolves to
must be globally routable (no loopback, private, link-local such as 169.254.169.254, CGNAT,
multicast, reserved, nor an IPv6 form of those: mapped, NAT64, 6to4...), IP literals are checked
the same way, redirects are followed by hand with each hop checked again, and size and time are
bounded. Any failure makes the request uncacheable; it then goes upstream untouched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .errors import ImageFetchError

_MAX_REDIRECTS = 3
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


# IPv6 prefixes whose last 32 bits are an IPv4 address that traffic is translated to: NAT64's
# well-known prefix (RFC 6052), SIIT's IPv4-translated form, the deprecated IPv4-compatible form.
_IPV4_TRANSLATED = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
# NAT64's local-use prefix (RFC 8215): a site's own translator, never a public destination.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def is_public_address(address: str) -> bool:
    """True when ``address`` is a globally routable unicast IP (for an IPv6 form of an IPv4
    address, mapped, translated, NAT64 or 6to4: when that IPv4 address is)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        ip = _embedded_ipv4(ip) or ip
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in _IPV4_TRANSLATED):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


class PublicOnlyResolver(AbstractResolver):
    """A resolver that drops every non-public address (and fails when none is left)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and keep only its public addresses."""
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            raise OSError(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()


def create_fetch_session(*, allow_private: bool) -> aiohttp.ClientSession:
    """A client session for image URLs, separate from the upstream's (which may be private)."""
    resolver: AbstractResolver = DefaultResolver() if allow_private else PublicOnlyResolver()
    connector = aiohttp.TCPConnector(resolver=resolver, limit=32, ttl_dns_cache=60)
    return aiohttp.ClientSession(connector=connector, auto_decompress=True)


class ImageFetcher:
    """Downloads image URLs safely: public addresses, bounded size, time and redirects."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_bytes: int,
        timeout: float,
        allow_private: bool,
    ) -> None:
        self._session = session
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._allow_private = allow_private

    async def fetch(self, url: str) -> bytes:
        """The bytes behind ``url``; ``ImageFetchError`` for anything unsafe or broken."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._follow(URL(url))
        except TimeoutError as exc:
            raise ImageFetchError(f"image URL took longer than {self._timeout:g} s") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ImageFetchError(f"image URL could not be fetched: {exc}") from exc

    async def _follow(self, url: URL) -> bytes:
        for _ in range(_MAX_REDIRECTS + 1):
            self._check(url)
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    url = url.join(URL(response.headers["Location"]))
                    continue
                if response.status != 200:
                    raise ImageFetchError(f"image URL answered {response.status}")
                return await self._read(response)
        raise ImageFetchError(f"more than {_MAX_REDIRECTS} redirects")

    def _check(self, url: URL) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise ImageFetchError("image URL is not http(s)")
        if self._allow_private:
            return
        try:
            literal: Any = ipaddress.ip_address(url.host.strip("[]"))
        except ValueError:
            return  # a name: the resolver checks every address it yields
        if not is_public_address(str(literal)):
            raise ImageFetchError("image URL points at a non-public address")

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not media.startswith("image/") or media.startswith("image/svg"):
            raise ImageFetchError(f"image URL served {media or 'no content type'}")
        if (response.content_length or 0) > self._max_bytes:
            raise ImageFetchError("image larger than the per-image limit")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._max_bytes:
                raise ImageFetchError("image larger than the per-image limit")
            chunks.append(chunk)
        return b"".join(chunks)
