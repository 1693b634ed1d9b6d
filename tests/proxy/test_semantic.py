"""The semantic tier end to end with the real offline embedder (EfficientNet-Lite0 weights)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image

from embeddings.embedder import Embedder, load_embedder
from proxy.app import ACCOUNTING, STORE, create_app, settle
from proxy.demo import product_photo, reencoded
from proxy.settings import Settings
from tests.conftest import AdminFactory, data_uri, openai_chat
from tests.fakes import FakeUpstream

ASK = "What phone is this? Does it support 5G?"
KEY = {"Authorization": "Bearer sk-semantic"}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("efficientnet-lite0", precision="fp32")


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Product shots and the edits users' apps make to them (made outside the event loop)."""
    phone = product_photo("X5 Pro", "2999", 40)
    watch = product_photo("Watch 3", "899", 90)
    return {
        "phone": phone,
        "phone_q60": reencoded(phone, quality=60),
        "phone_q50": reencoded(phone, quality=50),
        "phone_70%": reencoded(phone, quality=90, scale=0.7),
        "phone_3999": product_photo("X5 Pro", "3999", 40),
        "tablet": product_photo("Tab 11", "1899", 150),
        "watch": watch,
        "watch_q70": reencoded(watch, quality=70),
    }


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A small PNG that claims 30000 x 30000 pixels (900 M) when decoded."""
    image = Image.new("1", (30_000, 30_000))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def semantic_proxy(
    aiohttp_server: Any, upstream: tuple[FakeUpstream, TestServer], embedder: Embedder, tmp_path
) -> TestServer:
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",
        flush_interval=0.05,
    )
    return await aiohttp_server(create_app(settings, embedder=embedder))


async def ask(
    client: aiohttp.ClientSession,
    proxy: TestServer,
    photo: bytes,
    question: str = ASK,
    headers: dict[str, str] = KEY,
) -> dict[str, str]:
    body = openai_chat(question, data_uri(photo))
    async with client.post(proxy.make_url("/v1/chat/completions"), json=body, headers=headers) as r:
        assert r.status == 200
        await r.read()
        return dict(r.headers)


async def test_near_duplicates_hit_and_edited_or_other_pictures_miss(
    semantic_proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
) -> None:
    fake, _ = upstream
    first = await ask(client, semantic_proxy, photos["phone"])
    assert first["X-Cache"] == "MISS"
    await settle(semantic_proxy.app)

    for variant in (photos["phone_q60"], photos["phone_70%"]):
        headers = await ask(client, semantic_proxy, variant)
        assert (headers["X-Cache"], headers["X-Cache-Match"]) == ("HIT", "semantic")
        assert headers["X-Cache-Entry"] == first["X-Cache-Entry"]
        assert 0.9 < float(headers["X-Cache-Similarity"]) <= 1.0
        assert len(headers["X-Cache-Similarity"].split(".")[1]) == 4
    assert len(fake.chat_calls) == 1

    assert (await ask(client, semantic_proxy, photos["phone_3999"]))["X-Cache"] == "MISS"
    # The dashboard's near-misses: similar enough, but the verifier saw the changed price.
    near = semantic_proxy.app[ACCOUNTING].near_misses[-1]
    assert (near.reason, str(near.entry_id)) == ("verifier rejected", first["X-Cache-Entry"])
    assert near.similarity >= near.threshold
    assert (await ask(client, semantic_proxy, photos["tablet"]))["X-Cache"] == "MISS"
    # Same picture, other question or other tenant: never a semantic hit.
    other_question = await ask(client, semantic_proxy, photos["phone_q60"], "Is it waterproof?")
    assert other_question["X-Cache"] == "MISS"
    other_tenant = await ask(client, semantic_proxy, photos["phone_q60"], headers={})
    assert other_tenant["X-Cache"] == "MISS"
    assert len(fake.chat_calls) == 5


async def test_novel_question_does_not_wait_for_the_embedder(
    semantic_proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
) -> None:
    phone = photos["watch"]
    headers = await ask(client, semantic_proxy, phone, "Novel question?")
    assert headers["X-Cache"] == "MISS"
    # The exact tier serves the repeat at once, even before the vectors are stored.
    assert (await ask(client, semantic_proxy, phone, "Novel question?"))["X-Cache-Match"] == "exact"
    await settle(semantic_proxy.app)
    variant = await ask(client, semantic_proxy, photos["watch_q70"], "Novel question?")
    assert variant["X-Cache-Match"] == "semantic"


async def test_entries_and_vectors_survive_a_restart(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    embedder: Embedder,
    tmp_path,
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
) -> None:
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",
    )
    first = await aiohttp_server(create_app(settings, embedder=embedder))
    await ask(client, first, photos["phone"])
    await settle(first.app)
    await first.close()

    second = await aiohttp_server(create_app(settings, embedder=embedder))
    headers = await ask(client, second, photos["phone_q50"])
    assert headers["X-Cache-Match"] == "semantic"


async def test_hostile_images_never_reach_the_index(
    semantic_proxy: TestServer,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    bomb: bytes,
) -> None:
    fake, _ = upstream
    await ask(client, semantic_proxy, photos["phone"])  # the question now has a group
    await settle(semantic_proxy.app)
    for payload in (bomb, b"\xff\xd8\xff\xe0 corrupt jpeg", b"GIF89a" + b"\x00" * 20):
        headers = await ask(client, semantic_proxy, payload)
        assert headers["X-Cache"] == "MISS"
    await settle(semantic_proxy.app)
    store = semantic_proxy.app[STORE]
    assert store.vectors is not None and store.vectors.size == 1
    assert len(fake.chat_calls) == 4


async def test_a_deleted_entry_leaves_the_index(
    semantic_proxy: TestServer,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
) -> None:
    fake, _ = upstream
    admin = await make_admin(semantic_proxy)
    first = await ask(client, semantic_proxy, photos["phone"])
    await settle(semantic_proxy.app)
    store = semantic_proxy.app[STORE]
    assert store.vectors is not None and store.vectors.size == 1
    async with client.get(admin.make_url(f"/entries/{first['X-Cache-Entry']}")) as response:
        thumbnail = (await response.json())["image_list"][0]["thumbnail"]
    async with client.get(admin.make_url(thumbnail)) as response:
        assert response.content_type == "image/jpeg"
        assert Image.open(io.BytesIO(await response.read())).mode == "L"
    # A semantic hit first: the entry's thumbnails are now kept prepared in memory.
    assert (await ask(client, semantic_proxy, photos["phone_q50"]))["X-Cache-Match"] == "semantic"

    async with client.delete(admin.make_url(f"/entries/{first['X-Cache-Entry']}")) as response:
        assert response.status == 200
    assert store.vectors.size == 0
    assert (await ask(client, semantic_proxy, photos["phone_q60"]))["X-Cache"] == "MISS"
    assert len(fake.chat_calls) == 2


async def test_answers_stored_while_the_embedder_is_saturated_still_get_vectors(
    aiohttp_server: Any,
    upstream: tuple[FakeUpstream, TestServer],
    embedder: Embedder,
    client: aiohttp.ClientSession,
    photos: dict[str, bytes],
    tmp_path,
) -> None:
    settings = Settings(
        upstream=str(upstream[1].make_url("/")),
        data_dir=tmp_path / "data",
        embedder="efficientnet-lite0",
        embed_queue=1,  # one image waiting at most: a burst overflows it at once
    )
    proxy = await aiohttp_server(create_app(settings, embedder=embedder))
    names = ("phone", "tablet", "watch", "phone_3999")
    asked = await asyncio.gather(
        *(ask(client, proxy, photos[name], f"What is #{n}?") for n, name in enumerate(names))
    )
    assert [headers["X-Cache"] for headers in asked] == ["MISS"] * 4
    await settle(proxy.app)
    store = proxy.app[STORE]
    assert store.vectors is not None and store.vectors.size == 4  # none was left without vectors
    headers = await ask(client, proxy, photos["phone_q60"], "What is #0?")
    assert headers["X-Cache-Match"] == "semantic"
