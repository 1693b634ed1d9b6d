"""The admin listener: metrics, stats, health, auth, entries; real proxy, upstream and databases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from embeddings.keys import namespace_for
from proxy.app import create_app, settle
from proxy.settings import Settings
from tests.conftest import (
    AdminFactory,
    ProxyFactory,
    data_uri,
    jpeg_bytes,
    openai_chat,
    pg_database,
)
from tests.fakes import FakeUpstream

KEY_A = {"Authorization": "Bearer sk-tenant-a"}
KEY_B = {"Authorization": "Bearer sk-tenant-b"}
PRICES = """
currency = "USD"

[models."qwen3-vl-8b-instruct"]
input_per_million = 0.20
output_per_million = 1.60

[models."qwen3-vl-*"]
input_per_million = 1.00
output_per_million = 4.00
"""


async def ask(
    client: aiohttp.ClientSession,
    proxy: TestServer,
    body: Any,
    headers: dict[str, str] = KEY_A,
) -> dict[str, str]:
    async with client.post(
        proxy.make_url("/v1/chat/completions"), json=body, headers=headers
    ) as response:
        await response.read()
        return dict(response.headers)


async def admin_get(
    client: aiohttp.ClientSession, admin: TestServer, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with client.get(admin.make_url(path), **kwargs) as response:
        body = await response.read()
        if response.content_type == "application/json":
            return response.status, orjson.loads(body)
        return response.status, body.decode()


async def traffic(client: aiohttp.ClientSession, proxy: TestServer) -> None:
    """3 misses, 3 exact hits, 1 bypass (too many images), across two models and tenants."""
    photo = data_uri(jpeg_bytes(1))
    await ask(client, proxy, openai_chat("What phone is this?", photo))
    await ask(client, proxy, openai_chat("What phone is this?", photo))
    await ask(client, proxy, openai_chat("What phone is this?", photo))
    await ask(client, proxy, openai_chat("Is it 5G?", photo, model="qwen3-vl-plus"))
    await ask(client, proxy, openai_chat("Is it 5G?", photo, model="qwen3-vl-plus"))
    await ask(client, proxy, openai_chat("What phone is this?", photo), KEY_B)
    too_many = [data_uri(jpeg_bytes(n)) for n in range(5)]
    await ask(client, proxy, openai_chat("Which is cheapest?", *too_many))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_agree_with_stats_and_with_the_upstream(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    db_url: str,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    fake, _ = upstream
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    proxy = await make_proxy(db=db_url, pricing=prices)
    admin = await make_admin(proxy)
    await traffic(client, proxy)
    await settle(proxy.app)

    status, text = await admin_get(client, admin, "/metrics")
    assert status == 200
    metrics = samples(text)
    status, stats = await admin_get(client, admin, "/stats")
    assert status == 200

    def requests(outcome: str) -> float:
        return metrics[("vlcache_requests_total", (("outcome", outcome),))]

    expected = {"hit_exact": 3, "miss": 3, "bypass": 1, "hit_semantic": 0, "error": 0}
    for outcome, count in expected.items():
        assert requests(outcome) == count == stats["outcomes"][outcome]
    # Misses and the bypass reached the model; hits did not.
    assert len(fake.chat_calls) == requests("miss") + requests("bypass") == 4
    assert stats["requests"]["all"] == stats["requests"]["5m"] == 7
    assert stats["hit_rate"]["all"] == stats["hit_rate"]["5m"] == round(3 / 7, 4)

    # Every stand-in answer used 1200 prompt + 40 completion tokens.
    saved = stats["saved"]
    assert (saved["prompt_tokens"], saved["completion_tokens"]) == (3 * 1200, 3 * 40)
    assert metrics[("vlcache_saved_tokens_total", (("kind", "prompt"),))] == 3 * 1200
    # Two hits on the exactly priced model, one on the pattern-priced one.
    exact_price = (1200 * 0.20 + 40 * 1.60) / 1e6
    pattern_price = (1200 * 1.00 + 40 * 4.00) / 1e6
    assert saved["cost"] == pytest.approx(2 * exact_price + pattern_price)
    assert metrics[("vlcache_saved_cost_total", (("currency", "USD"),))] == pytest.approx(
        saved["cost"]
    )
    assert stats["currency"] == "USD"
    per_model = {m["model"]: m for m in stats["models"]}
    assert per_model["qwen3-vl-plus"]["saved"]["cost"] == pytest.approx(pattern_price)
    # Tenant A's miss and 2 hits, tenant B's miss; the bypass was never parsed to a model.
    assert per_model["qwen3-vl-8b-instruct"]["hit_rate"] == 0.5
    assert per_model["(unknown)"]["outcomes"]["bypass"] == 1

    assert stats["entries"]["count"] == 3
    assert metrics[("vlcache_entries", ())] == 3
    assert metrics[("vlcache_request_seconds_count", (("outcome", "hit_exact"),))] == 3
    assert metrics[("vlcache_upstream_seconds_count", ())] == 3
    assert metrics[("vlcache_lookup_seconds_count", ())] >= 6
    # No label carries a namespace, key or model name.
    for _name, labels in metrics:
        for label, value in labels:
            assert label in {"outcome", "kind", "currency", "component", "le"}, (label, value)

    this_hour = stats["series"][-1]
    assert len(stats["series"]) == 48
    assert (this_hour["requests"], this_hour["hits"]) == (7, 3)
    top = stats["top_entries"][0]
    assert (top["hits"], top["question"]) == (2, "What phone is this?")
    assert isinstance(top["id"], str)


async def test_time_saved_is_the_stored_latency_minus_the_hit(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    fake.latency = 0.3
    proxy = await make_proxy()
    admin = await make_admin(proxy)
    body = openai_chat("What phone is this?", data_uri(jpeg_bytes(3)))
    await ask(client, proxy, body)
    await ask(client, proxy, body)
    _, stats = await admin_get(client, admin, "/stats")
    assert 0.25 < stats["saved"]["time_s"] < 0.31
    assert stats["saved"]["cost"] is None and stats["currency"] is None  # no price table
    assert stats["spent"]["time_s"] >= 0.3


async def test_the_ledger_survives_a_restart(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    db_url: str,
    client: aiohttp.ClientSession,
    aiohttp_server: Any,
) -> None:
    proxy = await make_proxy(db=db_url)
    await traffic(client, proxy)
    await proxy.close()  # stops the app: buffered counters are written at close

    again = await make_proxy(db=db_url)
    admin = await make_admin(again)
    _, stats = await admin_get(client, admin, "/stats")
    assert stats["requests"]["all"] == 7 and stats["outcomes"]["hit_exact"] == 3
    assert stats["requests"]["5m"] == 0  # this process's own window starts empty
    await ask(client, again, openai_chat("What phone is this?", data_uri(jpeg_bytes(1))))
    _, stats = await admin_get(client, admin, "/stats")
    assert stats["outcomes"]["hit_exact"] == 4


async def test_admin_token(
    make_proxy: ProxyFactory, make_admin: AdminFactory, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(admin_token="s3cret-admin")
    admin = await make_admin(proxy)
    assert (await admin_get(client, admin, "/stats"))[0] == 401
    wrong = {"Authorization": "Bearer nope"}
    for path in ("/stats", "/metrics", "/entries", "/dashboard"):
        assert (await admin_get(client, admin, path, headers=wrong))[0] == 403
    right = {"Authorization": "Bearer s3cret-admin"}
    for path in ("/stats", "/metrics", "/entries", "/dashboard"):
        assert (await admin_get(client, admin, path, headers=right))[0] == 200
    # Probes need no token.
    status, health = await admin_get(client, admin, "/healthz")
    assert (status, health["status"], health["store"]) == (200, "ok", "ok")
    assert (await admin_get(client, admin, "/readyz"))[0] == 200

    # A browser trades the token once for a session cookie and lands on the plain URL.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        async with browser.get(admin.make_url("/dashboard?token=s3cret-admin")) as response:
            assert response.status == 200
            assert response.url.query_string == ""
            assert "s3cret-admin" not in str(jar.filter_cookies(admin.make_url("/")))
        async with browser.get(admin.make_url("/stats")) as response:
            assert response.status == 200
        async with browser.get(admin.make_url("/dashboard?token=wrong")) as response:
            assert response.status == 403


async def test_entries_list_inspect_delete_and_purge(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    db_url: str,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
) -> None:
    fake, _ = upstream
    proxy = await make_proxy(db=db_url)
    admin = await make_admin(proxy)
    await traffic(client, proxy)
    await settle(proxy.app)

    _, listing = await admin_get(client, admin, "/entries")
    assert len(listing["entries"]) == 3 and listing["next_cursor"] is None
    _, page = await admin_get(client, admin, "/entries?limit=2")
    assert len(page["entries"]) == 2 and page["next_cursor"] is not None
    _, rest = await admin_get(client, admin, f"/entries?limit=2&cursor={page['next_cursor']}")
    assert len(rest["entries"]) == 1
    _, plus = await admin_get(client, admin, "/entries?model=qwen3-vl-plus")
    assert [e["question"] for e in plus["entries"]] == ["Is it 5G?"]
    _, found = await admin_get(client, admin, "/entries?q=phone")
    assert len(found["entries"]) == 2
    _, none = await admin_get(client, admin, "/entries?q=%25")  # a literal %, not a wildcard
    assert none["entries"] == []

    entry = plus["entries"][0]
    status, detail = await admin_get(client, admin, f"/entries/{entry['id']}")
    assert status == 200
    assert detail["answer"]["object"] == "chat.completion"
    assert detail["hits"] == 1 and detail["saved"]["tokens"] == 1240
    assert detail["image_list"][0]["byte_size"] == len(jpeg_bytes(1))
    assert (await admin_get(client, admin, "/entries/12345"))[0] == 404

    async with client.delete(admin.make_url(f"/entries/{entry['id']}")) as response:
        assert (response.status, await response.json()) == (200, {"deleted": 1})
    async with client.delete(admin.make_url(f"/entries/{entry['id']}")) as response:
        assert response.status == 404
    calls = len(fake.chat_calls)
    photo = data_uri(jpeg_bytes(1))
    headers = await ask(client, proxy, openai_chat("Is it 5G?", photo, model="qwen3-vl-plus"))
    assert headers["X-Cache"] == "MISS" and len(fake.chat_calls) == calls + 1

    # Purge needs a condition; by namespace it takes tenant B's only entry.
    async with client.post(admin.make_url("/entries/purge"), json={}) as response:
        assert response.status == 400
        assert "at least one" in (await response.json())["error"]["message"]
    async with client.post(admin.make_url("/entries/purge"), json={"colour": "red"}) as r:
        assert r.status == 400
    await settle(proxy.app)
    tenant_b = namespace_for(KEY_B["Authorization"])
    _, theirs = await admin_get(client, admin, "/entries", params={"namespace": tenant_b})
    assert len(theirs["entries"]) == 1
    async with client.post(
        admin.make_url("/entries/purge"), json={"namespace": tenant_b}
    ) as response:
        assert (await response.json()) == {"deleted": 1}
    headers = await ask(client, proxy, openai_chat("What phone is this?", photo), KEY_B)
    assert headers["X-Cache"] == "MISS"
    await settle(proxy.app)
    # By age: nothing is an hour old; everything is older than "now".
    async with client.post(admin.make_url("/entries/purge"), json={"older_than": 3600}) as r:
        assert (await r.json()) == {"deleted": 0}
    async with client.post(
        admin.make_url("/entries/purge"), json={"created_before": time.time() + 1}
    ) as response:
        assert (await response.json()) == {"deleted": 3}
    _, empty = await admin_get(client, admin, "/entries")
    assert empty["entries"] == []
    headers = await ask(client, proxy, openai_chat("What phone is this?", photo))
    assert headers["X-Cache"] == "MISS"


async def test_health_reports_a_broken_store_and_stats_say_503(
    make_proxy: ProxyFactory, make_admin: AdminFactory, client: aiohttp.ClientSession
) -> None:
    async with pg_database("vlcache_health_") as (url, pg):
        proxy = await make_proxy(db=url)
        admin = await make_admin(proxy)
        assert (await admin_get(client, admin, "/healthz"))[1]["status"] == "ok"
        await pg.drop()
        status, health = await admin_get(client, admin, "/healthz")
        assert (status, health["status"]) == (200, "degraded")
        assert health["store"].startswith("unavailable")
        status, stats = await admin_get(client, admin, "/stats")
        assert (status, stats["error"]["code"]) == (503, "store_unavailable")
        status, text = await admin_get(client, admin, "/metrics")
        assert status == 200
        assert samples(text)[("vlcache_failures_total", (("component", "store"),))] >= 1
        assert (await admin_get(client, admin, "/readyz"))[0] == 200  # fail-open: still serving


class BrokenEmbedder:
    """An embedder whose every forward pass fails (a driver error, a corrupt model)."""

    id = "test/broken"
    dim = 8
    default_threshold = 0.9

    def embed(self, images: object) -> object:
        raise RuntimeError("CUDA error: device-side assert triggered")


async def test_a_failing_embedder_shows_in_health_and_metrics_while_answers_flow(
    aiohttp_server: Any,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    settings = Settings(
        upstream=str(upstream[1].make_url("/")), data_dir=tmp_path / "data", embedder="clip"
    )
    proxy = await aiohttp_server(create_app(settings, embedder=BrokenEmbedder()))
    admin = await make_admin(proxy)
    _, health = await admin_get(client, admin, "/healthz")
    assert (health["status"], health["embedder"]) == ("ok", "ok (test/broken)")
    photo = data_uri(jpeg_bytes(9, size=(200, 150)))
    await ask(client, proxy, openai_chat("What phone is this?", photo))
    await settle(proxy.app)
    # The question now has an exact entry; a new picture for it must be embedded to look up.
    headers = await ask(client, proxy, openai_chat("What phone is this?", data_uri(jpeg_bytes(8))))
    assert headers["X-Cache"] == "MISS"
    _, health = await admin_get(client, admin, "/healthz")
    assert health["status"] == "degraded" and health["embedder"].startswith("failing")
    _, text = await admin_get(client, admin, "/metrics")
    assert samples(text)[("vlcache_failures_total", (("component", "embedder"),))] >= 1
