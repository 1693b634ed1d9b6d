"""``CacheService``: one request's way through the cache, wired once from settings.

    read body -> key (namespace, fingerprint, image hashes) -> exact lookup
      -> semantic lookup (only when the question already has entries with as many images)
      hit  -> stored answer, no model run
      miss -> upstream with the original bytes -> answer to client -> store if complete

Everything that is not a chat request, and every chat the cache cannot key, goes to the upstream
untouched (``X-Cache: BYPASS``). For a question seen for the first time, embedding runs beside
the upstream call and the entry is stored when both are done, so novel questions wait for
nothing. The cache fails open: an error of the store, the embedder or the keying step is logged
(once per burst), counted, and the request is answered by the upstream. The semantic tier's
steps are ``SemanticSteps`` (semantic_steps.py); stream replay and fan-out are in streams.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from store.cache import CacheStore
from store.errors import StoreError
from store.records import NewEntry, StoredAnswer

from .accounting import Accounting
from .calls import CachedCall, Keyer, KnownBodies, cache_directives
from .claims import MissClaims
from .errors import BodyTimeout, BodyTooLarge, ClientGone, ProxyError, Uncacheable
from .failures import FailureLog
from .freshness import entry_ttl
from .native_sse import NativeStreamAssembler, incremental_output
from .protocol import AnswerFacts, read_answer
from .recorder import Exchange, Recorder
from .semantic import SemanticTier
from .semantic_steps import Embedding, SemanticSteps
from .settings import Settings
from .sse import StreamAssembler
from .streams import Flight, StreamFanout, feeding, follow_live, replay, stream_shape
from .upstream import Upstream, forwardable, relayable

log = logging.getLogger(__name__)

# Keyed calls remembered by their exact body bytes (see KnownBodies): bodies of up to
# _INLINE_BODY bytes are kept and looked up on the event loop, up to _KNOWN_BODY_BYTES in all.
_KNOWN_BODY_BYTES = 64 * 2**20
_INLINE_BODY = 2**20
# Identical requests in flight one waits for before asking the model itself.
_LEADERS_FOLLOWED = 2


class CacheService:
    """The cache in front of one upstream: keys requests, serves hits, stores answers."""

    def __init__(
        self,
        settings: Settings,
        store: CacheStore,
        upstream: Upstream,
        keyer: Keyer,
        accounting: Accounting,
        semantic: SemanticTier | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._accounting = accounting
        self._recorder = recorder
        self._upstream = upstream
        self._keyer = keyer
        self._failures = FailureLog(log)
        self._steps = SemanticSteps(semantic, store, accounting, self._fail)
        self._background: set[asyncio.Task[None]] = set()
        self._inflight: dict[str, Flight] = {}
        self._known_bodies = KnownBodies(_KNOWN_BODY_BYTES, _INLINE_BODY)
        self._claims = MissClaims(settings, store, self._fail, self._in_background)

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
        except ClientGone:
            # Nobody is left to answer (and aiohttp drops whatever is returned).
            log.info("client went away mid-request path=%s", request.path)
            return web.Response(status=499)
        started = time.perf_counter()
        directives = cache_directives(request.headers.get("Cache-Control", ""))
        body_key = await self._known_bodies.key(self._keyer.body_scope(request.headers), body)
        known = self._known_bodies.get(body_key, body)
        looked_up = known is not None and "no-cache" not in directives
        if looked_up:
            # A byte-identical repeat of a request keyed before: no parse, no image decode.
            assert known is not None
            served = await self._serve_exact(request, body, known, started)
            if served is not None:
                return served
            # The same request may be with the model right now: wait for it without re-parsing.
            followed = await self._follow_leader(request, body, known, started)
            if followed is not None:
                return followed
        try:
            call = await self._keyer.key(request.headers, body)
        except Uncacheable as exc:
            log.info("cache=bypass reason=%r path=%s", str(exc), request.path)
            self._accounting.count("bypass", self._keyer.namespace(request.headers), "")
            return await self._pass_through(request, body)
        except Exception:
            self._fail("keying", "keying a chat request failed")
            return await self._pass_through(request, body)
        if call is None:
            return await self._pass_through(request, body)
        # A known body was looked up above under this very exact key: a miss there is a miss here.
        if call.lookup and not looked_up:
            served = await self._serve_exact(request, body, call, started)
            if served is not None:
                # Answered by the exact tier: its next repeats skip the parse.
                self._known_bodies.put(body_key, body, call)
                return served
        for _ in range(_LEADERS_FOLLOWED):
            if call.exact_key not in self._inflight:
                break
            followed = await self._follow_leader(request, body, call, started)
            if followed is not None:
                return followed
            # The leader's answer could not be shared (error, not cacheable, leader gone): the
            # first follower to wake leads the next attempt, the others follow it.
        else:
            # Leader after leader could not share: ask ourselves.
            try:
                response, _ = await self._answer_miss(request, body, call, started)
                return response
            finally:
                self._claims.settle(call.exact_key)
        flight = Flight()
        self._inflight[call.exact_key] = flight
        answer = None
        try:
            response, answer = await self._answer_miss(request, body, call, started, flight)
            return response
        finally:
            del self._inflight[call.exact_key]
            flight.land(answer)
            self._claims.settle(call.exact_key)

    async def _follow_leader(
        self, request: web.Request, body: bytes, call: CachedCall, started: float
    ) -> web.StreamResponse | None:
        """The answer of an identical request already with the model, when it can be shared:
        live, as the leader relays it, when both stream alike; else once it is stored."""
        flight = self._inflight.get(call.exact_key)
        if flight is None:
            return None
        shape = stream_shape(call.chat)
        if shape is not None:
            fanout = await asyncio.shield(flight.fanout)
            if fanout is not None and fanout.shape == shape and not fanout.broken:
                return await self._serve_live(request, body, call, flight, fanout, started)
        shared = await asyncio.shield(flight.answer)
        if shared is None:
            return None
        return await self._serve_hit(request, body, call, shared, started, "coalesced", None)

    async def _answer_miss(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        started: float,
        flight: Flight | None = None,
    ) -> tuple[web.StreamResponse, StoredAnswer | None]:
        """Semantic tier, another process's identical call, else the upstream; returns the
        response and the answer it gave. ``flight``: this request leads identical ones."""
        embedding: Embedding
        if not call.lookup or not self._steps.wants_lookup(call):
            embedding = self._steps.embed_beside(call)
        else:
            embedding, for_now = await self._steps.embed(call)
            if embedding is not None:
                hit = await self._steps.lookup(call, embedding)
                if hit is not None:
                    response = await self._serve_hit(
                        request, body, call, hit.answer, started, "semantic", hit.similarity
                    )
                    return response, hit.answer
            elif for_now:
                # Busy or slow just now: the answer about to be stored still gets its vectors.
                embedding = self._steps.embed_beside(call)
        try:
            shared = await self._claims.follow(call)
        except StoreError:
            if isinstance(embedding, asyncio.Task):
                embedding.cancel()
            return await self._fail_open(request, body, call), None
        if shared is not None:
            if isinstance(embedding, asyncio.Task):
                embedding.cancel()
            response = await self._serve_hit(
                request, body, call, shared, started, "coalesced", None
            )
            return response, shared
        return await self._forward_miss(request, body, call, embedding, flight)

    async def drain(self) -> None:
        """Wait for the entries still being stored and the claims being given up (at shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole request body, its chunks joined once.

        ``request.read()`` copies a body twice (into a growing bytearray, then into bytes):
        measured on a bare aiohttp server with 202 KB bodies, joining the chunks instead took
        88-92 -> 70-74 us of CPU per request at 32 clients.
        """
        limit = self._settings.max_body_bytes
        if (request.content_length or 0) > limit:
            raise BodyTooLarge(f"request body is larger than {limit} bytes")
        chunks = []
        size = 0
        try:
            async with asyncio.timeout(self._settings.body_read_timeout):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLarge(f"request body is larger than {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError as exc:
            timeout = self._settings.body_read_timeout
            raise BodyTimeout(f"the request body took longer than {timeout:g} s to arrive") from exc
        except ConnectionResetError as exc:
            raise ClientGone from exc
        return b"".join(chunks)

    async def _serve_exact(
        self, request: web.Request, body: bytes, call: CachedCall, started: float
    ) -> web.StreamResponse | None:
        """The exact tier's answer (or the upstream's, when the store is down); None on a miss."""
        looking = time.perf_counter()
        try:
            answer = await self._store.find_exact(call.exact_key)
        except StoreError:
            return await self._fail_open(request, body, call)
        finally:
            self._accounting.metrics.lookup_seconds.observe(time.perf_counter() - looking)
        if answer is None:
            return None
        return await self._serve_hit(request, body, call, answer, started, "exact", None)

    async def _fail_open(
        self, request: web.Request, body: bytes, call: CachedCall
    ) -> web.StreamResponse:
        """The store is down: answer from the upstream untouched, store nothing."""
        self._fail("store", "cache store unavailable, answering from the upstream")
        self._accounting.count("bypass", call.namespace, call.chat.model)
        return await self._pass_through(request, body)

    async def _serve_hit(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        answer: StoredAnswer,
        started: float,
        match: str,
        similarity: float | None,
    ) -> web.StreamResponse:
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._note_hit(request, body, call, match, elapsed_ms, answer)
        headers = {
            "Content-Type": answer.content_type,
            "X-Cache": "HIT",
            "X-Cache-Match": match,
            "X-Cache-Entry": str(answer.entry_id),
            "Age": str(max(int(time.time() - answer.created_at), 0)),
        }
        if similarity is not None:
            headers["X-Cache-Similarity"] = f"{similarity:.4f}"
        log.info(
            "cache=hit match=%s%s entry=%d model=%s ms=%.2f",
            match,
            "" if similarity is None else f" sim={similarity:.4f}",
            answer.entry_id,
            call.chat.model,
            elapsed_ms,
        )
        if call.chat.stream:
            return await replay(request, call.chat, answer, headers)
        return web.Response(status=answer.status, body=answer.body, headers=headers)

    async def _serve_live(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        flight: Flight,
        fanout: StreamFanout,
        started: float,
    ) -> web.StreamResponse:
        """Follow an identical streamed miss as its leader relays it (a coalesced hit whose
        entry does not exist yet: no ``X-Cache-Entry``). If the leader's stream breaks off,
        this one is cut too, as the leader's is."""
        out = await follow_live(request, fanout, {"X-Cache": "HIT", "X-Cache-Match": "coalesced"})
        answer = await asyncio.shield(flight.answer)
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._note_hit(request, body, call, "coalesced", elapsed_ms, answer)
        log.info(
            "cache=hit match=coalesced stream=live complete=%s model=%s ms=%.2f",
            fanout.complete,
            call.chat.model,
            elapsed_ms,
        )
        return out

    async def _forward_miss(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        embedding: Embedding,
        flight: Flight | None,
    ) -> tuple[web.StreamResponse, StoredAnswer | None]:
        if call.chat.stream:
            return await self._forward_stream(request, body, call, embedding, flight)
        started = time.perf_counter()
        try:
            async with self._upstream.open(
                request.method, request.rel_url, _identity(request), body
            ) as up:
                answer_body = await up.read()
                upstream_ms = (time.perf_counter() - started) * 1000
                out_headers = relayable(up.headers)
                status, reason = up.status, up.reason
        except ProxyError as exc:
            return self._upstream_failed(call, exc, embedding), None
        out_headers.popall("Content-Length", None)
        out_headers["X-Cache"] = "MISS"
        ttl = entry_ttl(self._settings.ttl, request.headers, out_headers)
        facts = read_answer(call.chat.format, answer_body) if status == 200 else None
        entry = _cacheable_entry(call, status, out_headers, answer_body, upstream_ms, ttl, facts)
        if entry is not None:
            out_headers["X-Cache-Entry"] = str(entry.entry_id)
        response = web.Response(status=status, reason=reason, body=answer_body, headers=out_headers)
        try:
            # The client has waited for the model long enough: its answer goes out first, the
            # storing, counting, recording and logging after it. An identical request meanwhile
            # follows this one (its flight lands once the answer is stored).
            await _send(request, response)
        finally:
            self._keep_or_drop(entry, embedding)
            self._count_miss(call, upstream_ms, facts)
            content_type = out_headers.get("Content-Type", "application/json")
            self._record(
                request, body, call, "MISS", None, upstream_ms, status, content_type, answer_body
            )
            log.info(
                "cache=miss status=%d stored=%s model=%s upstream_ms=%.1f",
                status,
                entry is not None,
                call.chat.model,
                upstream_ms,
            )
        return response, entry.answer() if entry is not None else None

    async def _forward_stream(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        embedding: Embedding,
        flight: Flight | None,
    ) -> tuple[web.StreamResponse, StoredAnswer | None]:
        """Relay a streamed miss chunk by chunk; store the answer it spelled out if complete.

        Leading identical requests (``flight``), a storable stream is fanned out to them as it
        passes, and read to its end for them even if this request's client leaves.
        """
        assembler: StreamAssembler | NativeStreamAssembler = (
            NativeStreamAssembler(
                model=call.chat.model, incremental=incremental_output(call.chat.params)
            )
            if call.chat.format == "native"
            else StreamAssembler()
        )
        started = time.perf_counter()
        fanout = None
        try:
            async with self._upstream.open(
                request.method, request.rel_url, _identity(request), body
            ) as up:
                watch = (
                    up.status == 200
                    and up.content_type == "text/event-stream"
                    and "no-store" not in cache_directives(up.headers.get("Cache-Control", ""))
                )
                if flight is not None:
                    fanout = StreamFanout(stream_shape(call.chat)) if watch else None
                    flight.streams(fanout)
                relaying = self._upstream.relay(
                    request,
                    up,
                    {"X-Cache": "MISS"},
                    feeding(assembler, fanout) if watch else None,
                    for_others=None if fanout is None else fanout.followed,
                )
                relayed = await (relaying if fanout is None else fanout.carry(relaying))
                upstream_ms = (time.perf_counter() - started) * 1000
        except ProxyError as exc:
            return self._upstream_failed(call, exc, embedding), None
        finally:
            if fanout is not None:
                fanout.end(complete=False)  # the relay failed first (a no-op once carried)
        entry = None
        facts = None
        if watch and relayed.complete and assembler.complete:
            answer = orjson.dumps(assembler.completion())
            facts = read_answer(call.chat.format, answer)
            synthetic: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
            ttl = entry_ttl(self._settings.ttl, request.headers, relayed.response.headers)
            entry = _cacheable_entry(call, 200, synthetic, answer, upstream_ms, ttl, facts)
            self._record(
                request, body, call, "MISS", None, upstream_ms, 200, "application/json", answer
            )
        self._count_miss(call, upstream_ms, facts)
        self._keep_or_drop(entry, embedding)
        log.info(
            "cache=miss stream=true complete=%s stored=%s model=%s upstream_ms=%.1f",
            relayed.complete and assembler.complete,
            entry is not None,
            call.chat.model,
            upstream_ms,
        )
        return relayed.response, entry.answer() if entry is not None else None

    def _upstream_failed(
        self,
        call: CachedCall,
        exc: ProxyError,
        embedding: Embedding,
    ) -> web.Response:
        if isinstance(embedding, asyncio.Task):
            embedding.cancel()
        self._accounting.count("error", call.namespace, call.chat.model)
        log.warning("cache=miss upstream_error=%s model=%s", exc.code, call.chat.model)
        return exc.response()

    def _keep_or_drop(
        self,
        entry: NewEntry | None,
        embedding: Embedding,
    ) -> None:
        """Store a cacheable answer; otherwise stop embedding for it."""
        if entry is not None:
            self._claims.storing(entry.exact_key)
            self._store_later(entry, embedding)
        elif isinstance(embedding, asyncio.Task):
            embedding.cancel()

    def _note_hit(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        match: str,
        elapsed_ms: float,
        answer: StoredAnswer | None,
    ) -> None:
        """Count and record a hit with what it saved: the answer's usage, and the time the model
        took for it less this hit's (nothing saved, nothing recorded, when a live follower's
        answer was not stored)."""
        if answer is not None:
            self._record(
                request,
                body,
                call,
                "HIT",
                match,
                elapsed_ms,
                answer.status,
                answer.content_type,
                answer.body,
            )
        self._accounting.count(
            f"hit_{match}",
            call.namespace,
            call.chat.model,
            seconds=elapsed_ms / 1000,
            prompt_tokens=answer.prompt_tokens if answer else 0,
            completion_tokens=answer.completion_tokens if answer else 0,
            time_ms=max(answer.upstream_ms - elapsed_ms, 0.0) if answer else 0.0,
            entry_id=answer.entry_id if answer else None,
        )

    def _count_miss(self, call: CachedCall, upstream_ms: float, facts: AnswerFacts | None) -> None:
        self._accounting.metrics.upstream_seconds.observe(upstream_ms / 1000)
        self._accounting.count(
            "miss",
            call.namespace,
            call.chat.model,
            seconds=upstream_ms / 1000,
            prompt_tokens=facts.prompt_tokens if facts else 0,
            completion_tokens=facts.completion_tokens if facts else 0,
            time_ms=upstream_ms,
        )

    def _store_later(
        self,
        entry: NewEntry,
        embedding: Embedding,
    ) -> None:
        """Store ``entry`` now, or once its images' embedding is done (a tracked task)."""
        if not isinstance(embedding, asyncio.Task):
            self._store.add(self._steps.with_vectors(entry, embedding))
            return
        self._store.hold(entry)  # the exact tier can serve it while the vectors are computed

        async def finish() -> None:
            embedded = await embedding
            self._store.add(self._steps.with_vectors(entry, embedded))

        self._in_background(finish())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that ``drain`` waits for at shutdown."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fail(self, component: str, what: str) -> None:
        """A cache component failed (inside ``except``): count it, log it once per burst."""
        self._accounting.failure(component)
        self._failures.report(what)

    def _record(
        self,
        request: web.Request,
        body: bytes,
        call: CachedCall,
        cache: str,
        match: str | None,
        latency_ms: float,
        status: int,
        content_type: str,
        answer: bytes,
    ) -> None:
        """Append the exchange to the ``--record`` file, when recording."""
        if self._recorder is None:
            return
        written = self._recorder.write(
            Exchange(
                namespace=call.namespace,
                method=request.method,
                path=request.path,
                request_format=call.chat.format,
                model=call.chat.model,
                stream=call.chat.stream,
                cache=cache,
                match=match,
                latency_ms=latency_ms,
                request=body,
                status=status,
                content_type=content_type,
                response=answer,
                at=time.time(),
            )
        )
        if not written:
            self._accounting.failure("recorder")

    async def _pass_through(self, request: web.Request, data: object) -> web.StreamResponse:
        try:
            async with self._upstream.open(
                request.method, request.rel_url, forwardable(request.headers), data
            ) as up:
                relayed = await self._upstream.relay(request, up, {"X-Cache": "BYPASS"})
                return relayed.response
        except ProxyError as exc:
            log.warning("pass-through failed: %s", exc)
            return exc.response()


def _identity(request: web.Request) -> CIMultiDict[str]:
    """Headers for the upstream: the client's, asking for an uncompressed (storable) answer."""
    headers = forwardable(request.headers)
    headers["Accept-Encoding"] = "identity"
    return headers


def _cacheable_entry(
    call: CachedCall,
    status: int,
    headers: CIMultiDict[str],
    body: bytes,
    upstream_ms: float,
    ttl: float | None,
    facts: AnswerFacts | None,
) -> NewEntry | None:
    """The entry to store, or None when the answer is not cacheable."""
    if facts is None or not facts.complete or not call.store:
        return None
    if ttl is not None and ttl <= 0:
        return None
    if "no-store" in cache_directives(headers.get("Cache-Control", "")):
        return None
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    return call.entry(
        status=status,
        content_type=headers.get("Content-Type", "application/json"),
        body=body,
        prompt_tokens=facts.prompt_tokens,
        completion_tokens=facts.completion_tokens,
        upstream_ms=upstream_ms,
        expires_at=None if ttl is None else time.time() + ttl,
    )


async def _send(request: web.Request, response: web.Response) -> None:
    """Write ``response`` out now (a client that went away is no error)."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        log.info("client went away before its answer path=%s", request.path)
