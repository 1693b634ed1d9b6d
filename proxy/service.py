"""``CacheService``: one request's way through the cache, wired once from settings.

    read body -> parse chat -> key (namespace, fingerprint, image hashes) -> lookup
      hit  -> stored answer, no model run
      miss -> upstream with the original bytes -> answer to client -> store if complete

Everything that is not a chat request, and every chat the cache cannot key, goes to the upstream
untouched (``X-Cache: BYPASS``). The cache fails open: an error of the store or of the keying
step is logged (once per burst), counted, and the request is answered by the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from embeddings.keys import exact_key, image_digest, namespace_for, question_fingerprint
from store.cache import CacheStore, new_entry_id
from store.errors import StoreError
from store.records import NewEntry, NewImage, StoredAnswer

from .errors import BodyTooLarge, ProxyError, Uncacheable
from .failures import FailureLog
from .fetch import ImageFetcher
from .protocol import ChatRequest, parse_chat, read_answer
from .settings import Settings
from .upstream import Upstream, forwardable, relayable

log = logging.getLogger(__name__)

# Bodies above this are parsed and hashed in a worker thread, off the event loop.
_INLINE_PARSE_BYTES = 32 * 1024


@dataclass(frozen=True, slots=True)
class CachedCall:
    """A chat request with its cache keys."""

    chat: ChatRequest
    namespace: str
    fingerprint: str
    exact_key: str
    images: tuple[NewImage, ...]
    lookup: bool
    store: bool


class CacheService:
    """The cache in front of one upstream: keys requests, serves hits, stores answers."""

    def __init__(
        self, settings: Settings, store: CacheStore, upstream: Upstream, fetcher: ImageFetcher
    ) -> None:
        self._settings = settings
        self._store = store
        self._upstream = upstream
        self._fetcher = fetcher
        self._failures = FailureLog(log)

    async def respond(self, request: web.Request) -> web.StreamResponse:
        """Answer one client request (any method, any path)."""
        if request.method != "POST" or request.content_type.startswith("multipart/"):
            # Not a chat request: stream it through without buffering (file uploads, GETs...).
            return await self._pass_through(
                request, request.content if request.can_read_body else None
            )
        try:
            body = await self._read_body(request)
        except ProxyError as exc:
            return exc.response()
        started = time.perf_counter()
        try:
            call = await self._key(request, body)
        except Uncacheable as exc:
            log.info("cache=bypass reason=%r path=%s", str(exc), request.path)
            self._store.record("bypass", self._namespace(request), "")
            return await self._pass_through(request, body)
        except Exception:
            self._failures.report("keying a chat request failed")
            return await self._pass_through(request, body)
        if call is None:
            return await self._pass_through(request, body)
        if call.chat.stream:
            self._store.record("bypass", call.namespace, call.chat.model)
            return await self._pass_through(request, body)
        answer = await self._lookup(call)
        if answer is not None:
            return self._serve_hit(call, answer, started)
        return await self._forward_miss(request, body, call)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._settings.max_body_bytes
        if (request.content_length or 0) > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise BodyTooLarge(f"request body is larger than {limit} bytes") from exc

    def _namespace(self, request: web.Request) -> str:
        settings = self._settings
        credential = request.headers.get("Authorization") or request.headers.get("api-key")
        tenant = request.headers.get(settings.tenant_header) if settings.tenant_header else None
        return namespace_for(credential, shared=settings.shared_namespace, tenant=tenant)

    async def _key(self, request: web.Request, body: bytes) -> CachedCall | None:
        if len(body) > _INLINE_PARSE_BYTES:
            chat = await asyncio.get_running_loop().run_in_executor(None, self._parse, body)
        else:
            chat = self._parse(body)
        if chat is None:
            return None
        images = []
        for source in chat.images:
            data = source.data if source.data is not None else await self._fetch(source.url)
            images.append(NewImage(source.position, image_digest(data), len(data)))
        namespace = self._namespace(request)
        fingerprint = question_fingerprint(chat.format, chat.model, chat.turns, chat.params)
        directives = cache_directives(request.headers.get("Cache-Control", ""))
        return CachedCall(
            chat=chat,
            namespace=namespace,
            fingerprint=fingerprint,
            exact_key=exact_key(namespace, fingerprint, (i.sha256 for i in images)),
            images=tuple(images),
            lookup="no-cache" not in directives,
            store="no-store" not in directives,
        )

    def _parse(self, body: bytes) -> ChatRequest | None:
        settings = self._settings
        return parse_chat(
            body, max_images=settings.max_images, max_image_bytes=settings.max_image_bytes
        )

    async def _fetch(self, url: str | None) -> bytes:
        assert url is not None  # an ImageSource holds either data or a URL
        return await self._fetcher.fetch(url)

    async def _lookup(self, call: CachedCall) -> StoredAnswer | None:
        if not call.lookup:
            return None
        try:
            return await self._store.find_exact(call.exact_key)
        except StoreError:
            self._failures.report("cache lookup failed, answering from the upstream")
            return None

    def _serve_hit(self, call: CachedCall, answer: StoredAnswer, started: float) -> web.Response:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._store.record(
            "hit_exact",
            call.namespace,
            call.chat.model,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            time_ms=max(answer.upstream_ms - elapsed_ms, 0.0),
            entry_id=answer.entry_id,
        )
        log.info(
            "cache=hit match=exact entry=%d model=%s ms=%.2f",
            answer.entry_id,
            call.chat.model,
            elapsed_ms,
        )
        headers = {
            "Content-Type": answer.content_type,
            "X-Cache": "HIT",
            "X-Cache-Match": "exact",
            "X-Cache-Entry": str(answer.entry_id),
            "Age": str(max(int(time.time() - answer.created_at), 0)),
        }
        return web.Response(status=answer.status, body=answer.body, headers=headers)

    async def _forward_miss(
        self, request: web.Request, body: bytes, call: CachedCall
    ) -> web.StreamResponse:
        headers = forwardable(request.headers)
        # The answer must be readable to be stored: ask the upstream for an uncompressed body.
        headers["Accept-Encoding"] = "identity"
        started = time.perf_counter()
        try:
            async with self._upstream.open(request.method, request.rel_url, headers, body) as up:
                answer_body = await up.read()
                upstream_ms = (time.perf_counter() - started) * 1000
                out_headers = relayable(up.headers)
                status, reason = up.status, up.reason
        except ProxyError as exc:
            self._store.record("error", call.namespace, call.chat.model)
            log.warning("cache=miss upstream_error=%s model=%s", exc.code, call.chat.model)
            return exc.response()
        out_headers.popall("Content-Length", None)
        out_headers["X-Cache"] = "MISS"
        entry_id = self._store_answer(call, status, out_headers, answer_body, upstream_ms)
        if entry_id is not None:
            out_headers["X-Cache-Entry"] = str(entry_id)
        log.info(
            "cache=miss status=%d stored=%s model=%s upstream_ms=%.1f",
            status,
            entry_id is not None,
            call.chat.model,
            upstream_ms,
        )
        return web.Response(status=status, reason=reason, body=answer_body, headers=out_headers)

    def _store_answer(
        self,
        call: CachedCall,
        status: int,
        headers: CIMultiDict[str],
        body: bytes,
        upstream_ms: float,
    ) -> int | None:
        """Store a complete answer; returns its entry id, or None when it is not cacheable."""
        facts = read_answer(call.chat.format, body) if status == 200 else None
        self._store.record(
            "miss",
            call.namespace,
            call.chat.model,
            prompt_tokens=facts.prompt_tokens if facts else 0,
            completion_tokens=facts.completion_tokens if facts else 0,
            time_ms=upstream_ms,
        )
        if facts is None or not facts.complete or not call.store:
            return None
        if "no-store" in cache_directives(headers.get("Cache-Control", "")):
            return None
        if headers.get("Content-Encoding", "identity").lower() != "identity":
            return None
        entry = NewEntry(
            entry_id=new_entry_id(),
            namespace=call.namespace,
            fingerprint=call.fingerprint,
            exact_key=call.exact_key,
            model=call.chat.model,
            request_format=call.chat.format,
            question=call.chat.question,
            images=call.images,
            status=status,
            content_type=headers.get("Content-Type", "application/json"),
            body=body,
            prompt_tokens=facts.prompt_tokens,
            completion_tokens=facts.completion_tokens,
            upstream_ms=upstream_ms,
            created_at=time.time(),
        )
        stored = self._store.add(entry)
        return stored.entry_id if stored is not None else None

    async def _pass_through(self, request: web.Request, data: object) -> web.StreamResponse:
        try:
            async with self._upstream.open(
                request.method, request.rel_url, forwardable(request.headers), data
            ) as up:
                return await self._upstream.relay(request, up, {"X-Cache": "BYPASS"})
        except ProxyError as exc:
            log.warning("pass-through failed: %s", exc)
            return exc.response()


def cache_directives(value: str) -> set[str]:
    """Lower-cased directive names of a ``Cache-Control`` header value."""
    return {token.split("=", 1)[0].strip().lower() for token in value.split(",") if token.strip()}
