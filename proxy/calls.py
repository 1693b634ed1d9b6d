"""``Keyer``: from a chat request body to a ``CachedCall``, the request with its cache keys."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from dataclasses import dataclass

import xxhash
from multidict import CIMultiDictProxy

from embeddings.keys import exact_key, image_digest, namespace_for, question_fingerprint
from store.cache import new_entry_id
from store.memory import ByteLRU
from store.records import NewEntry, NewImage

from .fetch import ImageFetcher
from .native_sse import asks_for_stream
from .protocol import ChatRequest, parse_chat
from .settings import Settings

# Bodies above this are parsed and hashed in a worker thread, off the event loop. Parsing holds
# the GIL, so the thread only keeps very large bodies from stalling other requests; below this
# the hand-off costs more than it saves (measured: ~125 us per 200 KB request).
_INLINE_PARSE_BYTES = 1024 * 1024
# Images up to this (in all) are hashed on the event loop: SHA-256 of a 150 KB photo takes
# ~85-110 us, less than a miss waits for the hop to a worker thread and back on these VMs. Larger
# ones go to a worker thread (hashlib releases the GIL), so the loop is never held for long.
_INLINE_HASH_BYTES = 1024 * 1024
# Bytes of recent images kept to recognise a picture sent again (see ``ImageDigests``).
_RECENT_IMAGE_BYTES = 32 * 2**20


@dataclass(frozen=True, slots=True)
class CachedCall:
    """A chat request with its cache keys and its images' bytes (in position order)."""

    chat: ChatRequest
    namespace: str
    fingerprint: str
    exact_key: str
    image_data: tuple[bytes, ...]
    image_digests: tuple[str, ...]
    lookup: bool
    store: bool

    def entry(
        self,
        *,
        status: int,
        content_type: str,
        body: bytes,
        prompt_tokens: int,
        completion_tokens: int,
        upstream_ms: float,
        expires_at: float | None = None,
    ) -> NewEntry:
        """The entry that stores ``body`` as this call's answer (vectors come later)."""
        return NewEntry(
            entry_id=new_entry_id(),
            namespace=self.namespace,
            fingerprint=self.fingerprint,
            exact_key=self.exact_key,
            model=self.chat.model,
            request_format=self.chat.format,
            question=self.chat.question,
            images=tuple(
                NewImage(position, digest, len(data))
                for position, (digest, data) in enumerate(
                    zip(self.image_digests, self.image_data, strict=True)
                )
            ),
            status=status,
            content_type=content_type,
            body=body,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            upstream_ms=upstream_ms,
            created_at=time.time(),
            expires_at=expires_at,
        )

    def without_images(self) -> CachedCall:
        """This call without image bytes (small enough to remember)."""
        return dataclasses.replace(
            self, chat=dataclasses.replace(self.chat, images=()), image_data=()
        )


class Keyer:
    """Parses chat requests and computes their namespace, fingerprint and exact key."""

    def __init__(self, settings: Settings, fetcher: ImageFetcher) -> None:
        self._settings = settings
        self._fetcher = fetcher
        self._digests = ImageDigests(_RECENT_IMAGE_BYTES)

    def namespace(self, headers: CIMultiDictProxy[str]) -> str:
        """The caller's cache namespace (see ``embeddings.keys.namespace_for``)."""
        settings = self._settings
        credential = headers.get("Authorization") or headers.get("api-key")
        tenant = headers.get(settings.tenant_header) if settings.tenant_header else None
        return namespace_for(credential, shared=settings.shared_namespace, tenant=tenant)

    def body_scope(self, headers: CIMultiDictProxy[str]) -> str:
        """What besides its bytes tells two bodies apart: the namespace, and the stream form.

        A native request asks for a stream in a header, not in its body: the same bytes with
        and without ``X-DashScope-SSE`` are two requests (one answer, two forms).
        """
        return self.namespace(headers) + ("\0sse" if asks_for_stream(headers) else "")

    async def key(
        self, headers: CIMultiDictProxy[str], body: bytes, *, namespace: str | None = None
    ) -> CachedCall | None:
        """The keyed call; None when ``body`` is not a chat request; ``Uncacheable`` raised.

        ``namespace`` replaces the one the headers give (warm-up: logged requests carry no
        credentials, only the namespace they were keyed in or one named on the command line).
        """
        sse = asks_for_stream(headers)
        if len(body) > _INLINE_PARSE_BYTES:
            chat = await asyncio.get_running_loop().run_in_executor(None, self._parse, body, sse)
        else:
            chat = self._parse(body, sse)
        if chat is None:
            return None
        images = []
        for source in chat.images:
            if source.data is not None:
                images.append(source.data)
            else:
                assert source.url is not None  # an ImageSource holds data or a URL
                images.append(await self._fetcher.fetch(source.url))
        if namespace is None:
            namespace = self.namespace(headers)
        if sum(len(data) for data in images) > _INLINE_HASH_BYTES:
            digests = await asyncio.get_running_loop().run_in_executor(None, _digests, images)
        else:
            digests = tuple(self._digests.digest(namespace, data) for data in images)
        fingerprint = question_fingerprint(chat.format, chat.model, chat.turns, chat.params)
        directives = cache_directives(headers.get("Cache-Control", ""))
        return CachedCall(
            chat=chat,
            namespace=namespace,
            fingerprint=fingerprint,
            exact_key=exact_key(namespace, fingerprint, digests),
            image_data=tuple(images),
            image_digests=digests,
            lookup="no-cache" not in directives,
            store="no-store" not in directives,
        )

    def _parse(self, body: bytes, sse_requested: bool) -> ChatRequest | None:
        settings = self._settings
        return parse_chat(
            body,
            max_images=settings.max_images,
            max_image_bytes=settings.max_image_bytes,
            sse_requested=sse_requested,
        )


class KnownBodies:
    """Keyed calls by the exact bytes of their request body: a repeat skips parse and hashing.

    An app that sends the same photo and question again sends the same bytes. The service keeps
    a body once the exact tier answered it (at its first repeat), not at first sight: most
    misses are never sent again, and a run of them would push out the bodies that do come
    back. A body of up to ``inline`` bytes is found on the event loop by a fast
    non-cryptographic hash (xxh3, ~10 GB/s) within its scope (namespace, stream form) and
    confirmed by comparing the whole body (a memcmp), so a hash collision, chance or crafted,
    costs one comparison and can never serve another request's call; such bodies are kept. A
    larger body is keyed by its SHA-256, computed in a worker thread (hashlib releases
    the GIL), and not kept. Least recently used first out, up to ``max_bytes`` of kept bodies.
    """

    def __init__(self, max_bytes: int, inline: int) -> None:
        self._inline = inline
        self._items: ByteLRU[tuple[str, int | bytes], tuple[bytes | None, CachedCall]] = ByteLRU(
            max_bytes, _kept_bytes
        )

    async def key(self, scope: str, body: bytes) -> tuple[str, int | bytes]:
        """Where ``body`` is (or would be) known in ``scope``."""
        if len(body) <= self._inline:
            return scope, xxhash.xxh3_64_intdigest(body)
        loop = asyncio.get_running_loop()
        return scope, await loop.run_in_executor(None, _sha256, body)

    def get(self, key: tuple[str, int | bytes], body: bytes) -> CachedCall | None:
        """The call keyed for these very bytes before, if still known."""
        item = self._items.get(key)
        if item is None or (item[0] is not None and item[0] != body):
            return None
        return item[1]

    def put(self, key: tuple[str, int | bytes], body: bytes, call: CachedCall) -> None:
        """Remember ``call`` (without its images' bytes) for ``body``."""
        kept = body if isinstance(key[1], int) else None
        self._items.put(key, (kept, call.without_images()))


class ImageDigests:
    """SHA-256 digests of recent images: a picture sent again and again is hashed twice.

    Apps send the same picture many times: every turn of a conversation about a photo carries
    it again, and a product photo comes back with new questions. Each of those requests is a
    miss whose image would be hashed anew (~85-110 us for a 150 KB photo here). A picture's
    bytes are kept from its second sighting on (one seen once leaves only its xxh3), so that a
    run of one-off pictures does not push out the ones that come back. A kept picture
    is found by xxh3 of its bytes within its namespace and confirmed by comparing the bytes (a
    memcmp, as ``KnownBodies`` does), so a collision only costs one comparison. Per namespace,
    so that how fast a miss is says nothing about other tenants' pictures. Least recently used
    first out, up to ``max_bytes`` of kept pictures and ``max_seen`` hashes of pictures seen once.
    """

    def __init__(self, max_bytes: int, max_seen: int = 16_384) -> None:
        self._items: ByteLRU[tuple[str, int], tuple[bytes, str]] = ByteLRU(max_bytes, _image_bytes)
        self._seen: ByteLRU[tuple[str, int], bool] = ByteLRU(max_seen, _one)

    def digest(self, namespace: str, data: bytes) -> str:
        """``image_digest(data)``, remembered for ``namespace`` once seen twice."""
        key = (namespace, xxhash.xxh3_64_intdigest(data))
        item = self._items.get(key)
        if item is not None and item[0] == data:
            return item[1]
        digest = image_digest(data)
        if self._seen.get(key):
            self._items.put(key, (data, digest))
        else:
            self._seen.put(key, True)
        return digest


def _one(item: bool) -> int:
    return 1


def _image_bytes(item: tuple[bytes, str]) -> int:
    return len(item[0])


def _kept_bytes(item: tuple[bytes | None, CachedCall]) -> int:
    # A SHA-256-keyed item still costs its key and call: count it, so that their number is bounded.
    return 256 if item[0] is None else len(item[0])


def _sha256(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def _digests(images: list[bytes]) -> tuple[str, ...]:
    return tuple(image_digest(data) for data in images)


def cache_directives(value: str) -> set[str]:
    """Lower-cased directive names of a ``Cache-Control`` header value."""
    return {token.split("=", 1)[0].strip().lower() for token in value.split(",") if token.strip()}
