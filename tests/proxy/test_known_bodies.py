"""``KnownBodies`` and ``ImageDigests``: a repeated request body skips the parse, a repeated
picture its hash, and only the very same bytes do."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import proxy.calls
from proxy.calls import CachedCall, ImageDigests, Keyer, KnownBodies
from proxy.fetch import ImageFetcher
from proxy.settings import Settings

HEADERS = CIMultiDictProxy(CIMultiDict({"Authorization": "Bearer sk-known-bodies"}))


def chat(question: str, picture: bytes = b"\xff\xd8 not really a jpeg") -> bytes:
    uri = "data:image/jpeg;base64," + base64.b64encode(picture).decode()
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]
    return json.dumps(
        {"model": "qwen3-vl", "messages": [{"role": "user", "content": content}]}
    ).encode()


@pytest.fixture
async def keyer() -> AsyncIterator[Keyer]:
    settings = Settings(upstream="http://127.0.0.1:9", shared_namespace="known-bodies")
    async with aiohttp.ClientSession() as session:
        fetcher = ImageFetcher(session, max_bytes=1024, timeout=1.0, allow_private=False)
        yield Keyer(settings, fetcher)


async def keyed(keyer: Keyer, body: bytes) -> CachedCall:
    call = await keyer.key(HEADERS, body)
    assert call is not None
    return call


async def test_the_same_bytes_find_their_call_without_its_images(keyer: Keyer) -> None:
    memo = KnownBodies(max_bytes=1 << 20, inline=1 << 20)
    body = chat("What is this?")
    call = await keyed(keyer, body)
    key = await memo.key("ns", body)
    assert memo.get(key, body) is None
    memo.put(key, body, call)
    found = memo.get(await memo.key("ns", bytes(body)), bytes(body))
    assert found is not None
    assert found.exact_key == call.exact_key
    assert found.image_data == ()
    # Same bytes in another scope (namespace, stream form): not found.
    assert memo.get(await memo.key("other", body), body) is None


async def test_a_colliding_key_with_other_bytes_is_never_served(keyer: Keyer) -> None:
    memo = KnownBodies(max_bytes=1 << 20, inline=1 << 20)
    body = chat("What is this?")
    key = await memo.key("ns", body)
    memo.put(key, body, await keyed(keyer, body))
    # As if another body hashed to the same key (a chance or crafted xxh3 collision).
    assert memo.get(key, chat("What is that?")) is None
    assert memo.get(key, body[:-1] + b" ") is None


async def test_large_bodies_are_keyed_by_sha256_and_not_kept(keyer: Keyer) -> None:
    memo = KnownBodies(max_bytes=1 << 20, inline=64)
    body = chat("What is this?", b"\xff\xd8" + bytes(range(256)) * 8)
    key = await memo.key("ns", body)
    assert isinstance(key[1], bytes) and len(key[1]) == 32
    memo.put(key, body, await keyed(keyer, body))
    assert memo.get(await memo.key("ns", body), body) is not None
    other = chat("What is that?", b"\xff\xd8" + bytes(range(256)) * 8)
    assert memo.get(await memo.key("ns", other), other) is None


async def test_kept_bodies_are_bounded_in_bytes_least_recently_used_first(
    keyer: Keyer,
) -> None:
    bodies = [chat(f"Question {n}?", b"\xff\xd8" + bytes(300)) for n in range(4)]
    memo = KnownBodies(max_bytes=3 * len(bodies[0]) + 10, inline=1 << 20)
    keys = [await memo.key("ns", body) for body in bodies]
    for key, body in zip(keys[:3], bodies[:3], strict=True):
        memo.put(key, body, await keyed(keyer, body))
    assert memo.get(keys[0], bodies[0]) is not None  # now the most recently used
    memo.put(keys[3], bodies[3], await keyed(keyer, bodies[3]))
    assert memo.get(keys[1], bodies[1]) is None  # the least recently used went out
    assert all(
        memo.get(k, b) is not None for k, b in zip(keys, bodies, strict=True) if k != keys[1]
    )


class CountedHash:
    """``image_digest`` that counts the pictures it hashed."""

    def __init__(self) -> None:
        self.hashed: list[bytes] = []

    def __call__(self, data: bytes) -> str:
        self.hashed.append(data)
        return hashlib.sha256(data).hexdigest()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> CountedHash:
    hashing = CountedHash()
    monkeypatch.setattr(proxy.calls, "image_digest", hashing)
    return hashing


async def test_a_picture_sent_again_and_again_is_hashed_twice(
    keyer: Keyer, counted: CountedHash
) -> None:
    picture = b"\xff\xd8" + bytes(range(256)) * 40
    questions = ["What is this?", "What does it cost?", "Is it new?", "Does it fold?"]
    calls = [await keyed(keyer, chat(question, picture)) for question in questions]
    other = await keyed(keyer, chat("What is this?", picture[:-1] + b"\x01"))
    # Seen once: hashed, only its xxh3 kept; seen again: hashed and kept; then found.
    assert counted.hashed == [picture, picture, picture[:-1] + b"\x01"]
    digest = hashlib.sha256(picture).hexdigest()
    assert all(call.image_digests == (digest,) for call in calls)
    assert other.image_digests != calls[0].image_digests
    assert len({call.exact_key for call in calls}) == len(questions)


def test_a_colliding_picture_gets_its_own_digest(
    monkeypatch: pytest.MonkeyPatch, counted: CountedHash
) -> None:
    # Every picture hashes to the same xxh3 value (a chance or crafted collision).
    monkeypatch.setattr(proxy.calls.xxhash, "xxh3_64_intdigest", lambda data: 7)
    digests = ImageDigests(max_bytes=1 << 20)
    pictures = [b"\xff\xd8 one", b"\xff\xd8 one", b"\xff\xd8 two", b"\xff\xd8 one"]
    found = [digests.digest("ns", picture) for picture in pictures]
    assert found == [hashlib.sha256(picture).hexdigest() for picture in pictures]
    # "one" is kept at its second sighting; "two" fails the comparison and is hashed afresh
    # (and kept in its place), so "one" is hashed again.
    assert counted.hashed == pictures


def test_pictures_are_remembered_per_namespace_within_a_byte_budget(
    counted: CountedHash,
) -> None:
    pictures = [bytes([n]) * 1000 for n in range(4)]
    digests = ImageDigests(max_bytes=3000)
    for picture in pictures[:3] * 2:
        digests.digest("ns", picture)  # seen twice: all three kept, the budget is full
    assert len(counted.hashed) == 6
    digests.digest("ns", pictures[0])  # found, and now the most recently used
    digests.digest("other tenant", pictures[0])  # another namespace sees it for the first time
    assert len(counted.hashed) == 7
    digests.digest("ns", pictures[3])
    digests.digest("ns", pictures[3])  # kept: pictures[1], the least recently used, went out
    digests.digest("ns", pictures[0])
    digests.digest("ns", pictures[2])
    digests.digest("ns", pictures[1])
    assert counted.hashed[7:] == [pictures[3], pictures[3], pictures[1]]


def test_pictures_seen_once_are_bounded_in_number(counted: CountedHash) -> None:
    digests = ImageDigests(max_bytes=1 << 20, max_seen=2)
    pictures = [bytes([n]) * 100 for n in range(3)]
    for picture in pictures:
        digests.digest("ns", picture)  # the first one's hash went out
    digests.digest("ns", pictures[0])  # a first sighting again: not kept
    digests.digest("ns", pictures[2])  # a second sighting: kept
    digests.digest("ns", pictures[2])
    assert counted.hashed == [*pictures, pictures[0], pictures[2]]


def test_a_run_of_one_off_pictures_does_not_push_out_one_that_comes_back(
    counted: CountedHash,
) -> None:
    digests = ImageDigests(max_bytes=2500)
    hot = b"\xff" * 1000
    digests.digest("ns", hot)
    digests.digest("ns", hot)  # kept
    for n in range(10):
        digests.digest("ns", bytes([n]) * 1000)  # seen once each: never kept
    digests.digest("ns", hot)
    assert counted.hashed.count(hot) == 2
