"""The admin listener: metrics, stats, health, the dashboard and the entries API.

It runs on its own address (``--admin-host``/``--admin-port``, loopback by default) beside the
proxy, on the proxy's resources: ``create_admin_app(proxy_app)`` after the proxy app started.

    GET    /metrics                              Prometheus text format
    GET    /stats                                JSON figures (proxy.stats)
    GET    /healthz                              liveness, with store and embedder status
    GET    /readyz                               200 once serving, 503 while stopping
    GET    /dashboard                            the HTML page for people
    GET    /entries?namespace=&model=&q=&created_before=&created_after=&limit=&cursor=
    GET    /entries/{id}                         one entry: question, answer, images, savings
    GET    /entries/{id}/images/{position}/thumbnail   the verifier's thumbnail (JPEG)
    DELETE /entries/{id}                         delete one entry (SQL, memory tier, index)
    POST   /entries/purge  {"namespace", "model", "older_than", "created_before", ...}

With ``--admin-token`` every route but ``/healthz`` and ``/readyz`` wants
``Authorization: Bearer <token>`` (401 without it, 403 with a wrong one). A browser opens
``/dashboard?token=<token>`` once: it gets an HttpOnly session cookie derived from the token and
is redirected to the plain URL, so the token does not stay in the address bar or history.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import web

from embeddings.errors import ImageDecodeError
from embeddings.verifier import thumbnail_jpeg
from store.errors import StoreError
from store.reports import EntryDetail, EntryFilter, EntrySummary

from .app import ACCOUNTING, SEMANTIC, SETTINGS, STORE
from .stats import TierInfo, stats_document

log = logging.getLogger(__name__)

PROXY_APP = web.AppKey("proxy_app", web.Application)
DASHBOARD = web.AppKey("dashboard", bytes)
STOPPING = web.AppKey("stopping", asyncio.Event)

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_COOKIE = "vlcache_admin"
_MAX_LIST = 500
_HEALTH_TIMEOUT = 2.0
_RECENT_FAILURE = 60.0  # an embedder that failed this recently is reported as failing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application over the resources of the (started) ``proxy_app``."""
    app = web.Application(middlewares=[_json_errors, _authenticate])
    app[PROXY_APP] = proxy_app
    app[STOPPING] = asyncio.Event()
    app.on_startup.append(_load_dashboard)
    app.on_shutdown.append(_stopping)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/", home)
    app.router.add_get("/entries", list_entries)
    app.router.add_post("/entries/purge", purge)
    app.router.add_get(r"/entries/{entry_id:\d+}", show_entry)
    app.router.add_delete(r"/entries/{entry_id:\d+}", delete_entry)
    app.router.add_get(r"/entries/{entry_id:\d+}/images/{position:\d+}/thumbnail", entry_thumbnail)
    return app


async def _load_dashboard(app: web.Application) -> None:
    page = files("proxy").joinpath("dashboard.html")
    app[DASHBOARD] = await asyncio.to_thread(page.read_bytes)


async def _stopping(app: web.Application) -> None:
    app[STOPPING].set()


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "admin_error", "param": None, "code": code}}
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors in the OpenAI shape, like the proxy's own; the store being down is a 503."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason, exc.reason.lower().replace(" ", "_"))
    except StoreError as exc:
        log.warning("admin %s %s: store unavailable: %s", request.method, request.path, exc)
        return _error(503, f"the cache store is unavailable: {exc}", "store_unavailable")


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[PROXY_APP][SETTINGS].admin_token
    if token is None or request.path in _OPEN_PATHS:
        return await handler(request)
    session = _session_value(token)
    given = request.query.get("token") if request.path == "/dashboard" else None
    if given is not None:
        if not _same(given, token):
            return _error(403, "wrong admin token", "forbidden")
        response = _redirect("/dashboard")
        response.set_cookie(
            _COOKIE, session, httponly=True, samesite="Strict", path="/", max_age=86400
        )
        return response
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not _same(credential.strip(), token):
            return _error(403, "wrong admin token", "forbidden")
        return await handler(request)
    cookie = request.cookies.get(_COOKIE)
    if cookie is not None:
        if not _same(cookie, session):
            return _error(403, "stale or wrong admin session", "forbidden")
        return await handler(request)
    response = _error(401, "the admin API needs Authorization: Bearer <token>", "unauthorized")
    response.headers["WWW-Authenticate"] = 'Bearer realm="vlcache admin"'
    return response


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _session_value(token: str) -> str:
    """The dashboard cookie: derived from the token, so the cookie is not the token itself."""
    return hmac.new(token.encode(), b"vlcache dashboard session", hashlib.sha256).hexdigest()


def _tier(proxy: web.Application) -> TierInfo:
    semantic = proxy[SEMANTIC]
    store = proxy[STORE]
    if semantic is None:
        return TierInfo()
    return TierInfo(
        embedder=semantic.embedder.id,
        threshold=semantic.threshold,
        vectors=store.vectors.size if store.vectors is not None else 0,
        embed_queue=semantic.queue_depth,
    )


async def home(_request: web.Request) -> web.Response:
    """The listener's root leads to the dashboard."""
    return _redirect("/dashboard")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics."""
    proxy = request.app[PROXY_APP]
    accounting = proxy[ACCOUNTING]
    try:
        accounting.entries = await asyncio.wait_for(proxy[STORE].entry_totals(), _HEALTH_TIMEOUT)
    except (StoreError, TimeoutError):
        accounting.failure("store")  # the entry gauges keep their last reading
    body = await asyncio.to_thread(accounting.metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def stats(request: web.Request) -> web.Response:
    """The operators' figures (``proxy.stats``); counters are flushed first."""
    proxy = request.app[PROXY_APP]
    store = proxy[STORE]
    await store.flush()
    accounting = proxy[ACCOUNTING]
    document = await stats_document(store, accounting.pricing, _tier(proxy), accounting)
    return _json(document)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers; the store's and embedder's state are reported."""
    proxy = request.app[PROXY_APP]
    try:
        await asyncio.wait_for(proxy[STORE].ping(), _HEALTH_TIMEOUT)
        store_state = "ok"
    except (StoreError, TimeoutError) as exc:
        store_state = f"unavailable: {exc or 'no answer in time'}"
    semantic = proxy[SEMANTIC]
    if semantic is None:
        embedder_state = "off"
    else:
        failed = proxy[ACCOUNTING].last_failure.get("embedder")
        recent = failed is not None and time.time() - failed < _RECENT_FAILURE
        embedder_state = (
            f"failing ({semantic.embedder.id}: last error {time.time() - failed:.0f} s ago)"
            if recent and failed is not None
            else f"ok ({semantic.embedder.id})"
        )
    healthy = store_state == "ok" and embedder_state.startswith(("ok", "off"))
    return _json(
        {
            "status": "ok" if healthy else "degraded",
            "store": store_state,
            "embedder": embedder_state,
            "note": None if healthy else "requests are answered by the upstream (fail-open)",
        }
    )


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while serving, 503 once shutting down."""
    if request.app[STOPPING].is_set():
        return _json({"ready": False, "reason": "shutting down"}, status=503)
    return _json({"ready": True})


async def dashboard(request: web.Request) -> web.Response:
    """The HTML dashboard (it reads ``stats`` from this same listener)."""
    return web.Response(
        body=request.app[DASHBOARD],
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Cache-Control": "no-store",
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def _filter(values: Any) -> EntryFilter:
    def number(name: str) -> float | None:
        raw = values.get(name)
        if raw is None or raw == "":
            return None
        if isinstance(raw, bool):
            raise web.HTTPBadRequest(reason=f"{name} must be a number")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise web.HTTPBadRequest(reason=f"{name} must be a number") from None

    def text(name: str) -> str | None:
        raw = values.get(name)
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str):
            raise web.HTTPBadRequest(reason=f"{name} must be a string")
        return raw

    before = number("created_before")
    older_than = number("older_than")
    if older_than is not None:
        cutoff = time.time() - older_than
        before = cutoff if before is None else min(before, cutoff)
    return EntryFilter(
        namespace=text("namespace"),
        model=text("model"),
        created_before=before,
        created_after=number("created_after"),
        question_contains=text("q"),
    )


def _summary(entry: EntrySummary, proxy: web.Application) -> dict[str, Any]:
    pricing = proxy[ACCOUNTING].pricing
    prompt, completion = entry.hits * entry.prompt_tokens, entry.hits * entry.completion_tokens
    return {
        "id": str(entry.id),
        "namespace": entry.namespace,
        "model": entry.model,
        "question": entry.question,
        "images": entry.images,
        "hits": entry.hits,
        "prompt_tokens": entry.prompt_tokens,
        "completion_tokens": entry.completion_tokens,
        "upstream_ms": round(entry.upstream_ms, 3),
        "size_bytes": entry.size_bytes,
        "created_at": round(entry.created_at, 3),
        "last_hit_at": entry.last_hit_at,
        "expires_at": entry.expires_at,
        "saved": {
            "tokens": prompt + completion,
            "cost": pricing.cost(entry.model, prompt, completion) if pricing.priced else None,
            "time_s": round(entry.hits * entry.upstream_ms / 1000, 3),
        },
    }


async def list_entries(request: web.Request) -> web.Response:
    """Live entries, newest first, filtered; ``next_cursor`` pages on."""
    proxy = request.app[PROXY_APP]
    where = _filter(request.query)
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), _MAX_LIST)
        cursor = int(request.query["cursor"]) if request.query.get("cursor") else None
    except ValueError:
        raise web.HTTPBadRequest(reason="limit and cursor must be integers") from None
    entries = await proxy[STORE].list_entries(where, limit=limit, before_id=cursor)
    next_cursor = str(entries[-1].id) if len(entries) == limit else None
    return _json({"entries": [_summary(e, proxy) for e in entries], "next_cursor": next_cursor})


def _entry_id(request: web.Request) -> int:
    return int(request.match_info["entry_id"])


async def show_entry(request: web.Request) -> web.Response:
    """One entry in full."""
    proxy = request.app[PROXY_APP]
    entry_id = _entry_id(request)
    detail = await proxy[STORE].entry(entry_id)
    if detail is None:
        raise web.HTTPNotFound(reason="no live entry with this id")
    return _json(_detail(detail, proxy))


def _detail(detail: EntryDetail, proxy: web.Application) -> dict[str, Any]:
    summary = _summary(detail.summary, proxy)
    entry_id = summary["id"]
    try:
        answer: Any = orjson.loads(detail.body)
    except orjson.JSONDecodeError:
        answer = detail.body.decode("utf-8", "replace")
    return {
        **summary,
        "request_format": detail.request_format,
        "fingerprint": detail.fingerprint,
        "status": detail.status,
        "content_type": detail.content_type,
        "answer": answer,
        "image_list": [
            {
                "position": image.position,
                "sha256": image.sha256,
                "byte_size": image.byte_size,
                "embedder": image.embedder,
                "thumbnail": (
                    f"/entries/{entry_id}/images/{image.position}/thumbnail"
                    if image.has_thumbnail
                    else None
                ),
            }
            for image in detail.images
        ],
    }


async def entry_thumbnail(request: web.Request) -> web.Response:
    """The verifier thumbnail of one image (greyscale JPEG)."""
    proxy = request.app[PROXY_APP]
    blob = await proxy[STORE].thumbnail(_entry_id(request), int(request.match_info["position"]))
    if blob is None:
        raise web.HTTPNotFound(reason="no thumbnail for this image")
    try:
        picture = thumbnail_jpeg(blob)
    except ImageDecodeError:
        raise web.HTTPNotFound(reason="no thumbnail for this image") from None
    return web.Response(
        body=picture, headers={"Content-Type": "image/jpeg", "Cache-Control": "private"}
    )


async def delete_entry(request: web.Request) -> web.Response:
    """Delete one entry: it is tombstoned in SQL and leaves the memory tier and the index."""
    proxy = request.app[PROXY_APP]
    entry_id = _entry_id(request)
    if not await proxy[STORE].delete(entry_id):
        raise web.HTTPNotFound(reason="no live entry with this id")
    log.info("admin: deleted entry %d", entry_id)
    return _json({"deleted": 1})


async def purge(request: web.Request) -> web.Response:
    """Delete every live entry the JSON body's conditions select (at least one is required)."""
    proxy = request.app[PROXY_APP]
    try:
        values = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body must be a JSON object") from None
    if not isinstance(values, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    known = {"namespace", "model", "older_than", "created_before", "created_after", "q"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise web.HTTPBadRequest(reason=f"unknown purge conditions: {', '.join(unknown)}")
    where = _filter(values)
    if where.empty:
        raise web.HTTPBadRequest(
            reason="a purge needs at least one of: " + ", ".join(sorted(known))
        )
    deleted = await proxy[STORE].purge(where)
    log.info("admin: purged %d entries (%s)", deleted, where)
    return _json({"deleted": deleted})
