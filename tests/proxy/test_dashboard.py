"""The dashboard in a real browser: headless Chromium on the admin listener of a real proxy.

The proxy runs the offline semantic tier behind the fake upstream, with a price table and an admin
token. Its savings ledger holds earlier hours (rows as an earlier process or another replica
writes them) and live traffic produces every outcome, thumbnails, a near miss the verifier
rejected and a question with markup in it. Chromium (Debian's ``chromium``; the browser tests
skip without it) opens ``/dashboard?token=...`` as a person would, and the test reads the DOM the
page built (``--dump-dom``) against the ``/stats`` document; screenshots go to tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.app import settle
from proxy.demo import product_photo, reencoded
from store.database import create_engine
from store.ledger import Counters, Tally
from tests.conftest import (
    AdminFactory,
    ProxyFactory,
    data_uri,
    jpeg_bytes,
    openai_chat,
)
from tests.fakes import FakeUpstream, Reply

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no /usr/bin/chromium: install Debian's chromium to run the dashboard's browser tests",
)

TOKEN = "dashboard-admin-token"
KEY = {"Authorization": "Bearer sk-dashboard"}
PRICES = """
currency = "USD"

[models."qwen3-vl-8b-instruct"]
input_per_million = 0.20
output_per_million = 1.60

[models."qwen3-vl-*"]
input_per_million = 1.00
output_per_million = 4.00
"""
PHONE_QUESTION = "What phone is this? Does it support 5G?"
HOSTILE_QUESTION = "<img src=x onerror=\"document.title='pwned'\"> <b>what brand</b> & price?"
TEXT_QUESTION = "Summarise the return policy in one sentence."
RECEIPT_QUESTION = "What is the total on this receipt?"
IDLE_HOURS = {12, 13, 14}  # hours ago with no traffic: a gap in the hit-rate line
HISTORY_HOURS = 40


# The browser.


async def chromium(tmp_path: Path, url: str, *args: str) -> bytes:
    """Run headless Chromium once on ``url`` with a fresh profile; its stdout."""
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--lang=en-US",
        "--hide-scrollbars",
        # Virtual time stands still while requests are in flight: the stats fetch and the
        # thumbnails complete before the dump or the screenshot.
        "--virtual-time-budget=5000",
        *args,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TZ": "UTC"},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    noise = ("dbus", "unexpected operator")
    log = [
        line
        for line in err.decode(errors="replace").splitlines()
        if not any(n in line for n in noise)
    ]
    assert process.returncode == 0, "chromium failed:\n" + "\n".join(log[-20:])
    return out


async def dump_dom(tmp_path: Path, url: str) -> Element:
    """The DOM after the page's scripts ran, parsed."""
    html = await chromium(tmp_path, url, "--window-size=1280,900", "--dump-dom")
    return parse_html(html.decode())


async def screenshot(tmp_path: Path, url: str, name: str, width: int, height: int) -> Path:
    """A PNG of the page at width x height (Chromium lays out no narrower than 500 px)."""
    path = tmp_path / name
    await chromium(tmp_path, url, f"--window-size={width},{height}", f"--screenshot={path}")
    head = await asyncio.to_thread(lambda: path.read_bytes()[:24])
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert struct.unpack(">II", head[16:24]) == (width, height)
    return path


# A small DOM over html.parser.

_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "wbr",
}


@dataclass
class Element:
    """One element of the dumped DOM (tag and attribute names lower-cased by html.parser)."""

    tag: str
    attrs: dict[str, str]
    children: list[Element | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Element]:
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.iter()
            if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
        ]

    def by_id(self, element_id: str) -> Element:
        found = [e for e in self.iter() if e.attrs.get("id") == element_id]
        assert len(found) == 1, f"expected one #{element_id}, found {len(found)}"
        return found[0]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self._open[-1].children.append(element)
        if tag not in _VOID:
            self._open.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open[-1].children.append(Element(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def parse_html(html: str) -> Element:
    """``html`` as a tree of ``Element``."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# How the page writes figures (en-US).


def percent(rate: float) -> str:
    """Intl percent with at most one decimal, rounding half away from zero."""
    value = (Decimal(str(rate)) * 100).quantize(Decimal("0.1"), ROUND_HALF_UP)
    return f"{value.normalize():f}%"


def usd(amount: float) -> str:
    cents = Decimal(str(amount)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return f"${cents:,}"


def assert_scaled(pairs: list[tuple[float, float]], what: str) -> None:
    """Every (value, pixel) pair lies on one rising line through the two extreme values."""
    (v0, p0), (v1, p1) = min(pairs), max(pairs)
    assert v1 > v0, f"{what}: need two distinct values"
    slope = (p1 - p0) / (v1 - v0)
    assert slope > 0, f"{what}: larger values are not drawn larger"
    for value, pixel in pairs:
        assert abs(p0 + (value - v0) * slope - pixel) < 0.25, f"{what}: {value} drawn at {pixel}"


# Traffic.


async def ask(
    client: aiohttp.ClientSession, proxy: TestServer, body: dict[str, Any]
) -> dict[str, str]:
    async with client.post(proxy.make_url("/v1/chat/completions"), json=body, headers=KEY) as r:
        await r.read()
        return {"status": str(r.status), **r.headers}


async def write_history(db_url: str, now_hour: int) -> None:
    """Ledger rows of earlier hours, written as the process before this one did."""
    counters = Counters()
    for hours_ago in range(HISTORY_HOURS, 0, -1):
        if hours_ago in IDLE_HOURS:
            continue
        hour = now_hour - hours_ago * 3600
        requests = 30 + (hours_ago * 17) % 40
        hits = round(requests * (0.2 + 0.6 * (HISTORY_HOURS - hours_ago) / HISTORY_HOURS))
        semantic = hits // 4
        for outcome, count in (
            ("hit_exact", hits - semantic),
            ("hit_semantic", semantic),
            ("miss", requests - hits),
        ):
            prompt, completion = count * 1100, count * 150
            counters.rows[(hour, "earlier-process", "qwen3-vl-8b-instruct", outcome)] = Tally(
                requests=count,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost=(prompt * 0.20 + completion * 1.60) / 1_000_000,
                time_ms=count * 1150.0,
            )
    engine = await asyncio.to_thread(create_engine, db_url)
    try:
        async with engine.begin() as conn:
            await counters.write(conn)
    finally:
        await engine.dispose()


def make_pictures() -> dict[str, bytes]:
    """The pictures of the traffic (PIL work: run in a worker thread)."""
    phone = product_photo("X5 Pro", "2999", 40)
    return {
        "phone": phone,
        "phone_q60": reencoded(phone, quality=60),
        "phone_3999": product_photo("X5 Pro", "3999", 40),
        "watch": product_photo("Watch 3", "899", 90),
        "tablet": product_photo("Tab 11", "1899", 150),
        # Over --max-image-pixels: cached by the exact tier only, so it has no thumbnail.
        "receipt": jpeg_bytes(7, size=(640, 480)),
        **{f"small{i}": jpeg_bytes(i) for i in range(5)},
    }


async def send_traffic(
    client: aiohttp.ClientSession, proxy: TestServer, fake: FakeUpstream
) -> dict[str, str]:
    """Every outcome once or more; the entry ids by name."""
    pictures = await asyncio.to_thread(make_pictures)
    phone, watch, tablet = pictures["phone"], pictures["watch"], pictures["tablet"]
    receipt = pictures["receipt"]
    ids: dict[str, str] = {}

    first = await ask(client, proxy, openai_chat(PHONE_QUESTION, data_uri(phone)))
    assert first["X-Cache"] == "MISS"
    ids["phone"] = first["X-Cache-Entry"]
    hostile = openai_chat(HOSTILE_QUESTION, data_uri(watch))
    ids["hostile"] = (await ask(client, proxy, hostile))["X-Cache-Entry"]
    text_only = openai_chat(TEXT_QUESTION, model="qwen3-vl-plus")
    ids["text"] = (await ask(client, proxy, text_only))["X-Cache-Entry"]
    receipt_body = openai_chat(RECEIPT_QUESTION, data_uri(receipt))
    ids["receipt"] = (await ask(client, proxy, receipt_body))["X-Cache-Entry"]
    await settle(proxy.app)

    again = openai_chat(PHONE_QUESTION, data_uri(phone))
    for _ in range(3):
        assert (await ask(client, proxy, again))["X-Cache-Match"] == "exact"
    resent = openai_chat(PHONE_QUESTION, data_uri(pictures["phone_q60"]))
    assert (await ask(client, proxy, resent))["X-Cache-Match"] == "semantic"
    # The same phone at another price: similar, but the verifier rejects it (a near miss).
    repriced = openai_chat(PHONE_QUESTION, data_uri(pictures["phone_3999"]))
    assert (await ask(client, proxy, repriced))["X-Cache"] == "MISS"
    for body in (hostile, hostile, text_only, receipt_body):
        assert (await ask(client, proxy, body))["X-Cache"] == "HIT"

    fake.push(Reply(hang=0.3))
    together = openai_chat("Is it waterproof?", data_uri(tablet))
    answers = await asyncio.gather(*(ask(client, proxy, together) for _ in range(3)))
    outcomes = sorted(h["X-Cache"] + h.get("X-Cache-Match", "") for h in answers)
    assert outcomes == ["HITcoalesced", "HITcoalesced", "MISS"]

    fake.push(Reply(cut_off=True))
    broken = await ask(client, proxy, openai_chat("Which colour is it?", data_uri(tablet)))
    assert broken["status"] == "502"
    too_many = openai_chat("Compare these.", *[data_uri(pictures[f"small{i}"]) for i in range(5)])
    assert (await ask(client, proxy, too_many))["X-Cache"] == "BYPASS"
    await settle(proxy.app)
    return ids


async def admin_json(client: aiohttp.ClientSession, admin: TestServer, path: str) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with client.get(admin.make_url(path), headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


# Tests.


def test_dashboard_is_self_contained() -> None:
    """No scripts, styles, fonts or images from anywhere: the page works air-gapped."""
    page = files("proxy").joinpath("dashboard.html").read_text()
    urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'`)<>]*", page, re.IGNORECASE))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    assert not re.search(r"@import|@font-face|url\(|<link\b|\bsrc=[\"']?//", page)
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page
    assert "document.write" not in page


@needs_chromium
async def test_dashboard_before_any_traffic(
    make_proxy: ProxyFactory, make_admin: AdminFactory, tmp_path: Path
) -> None:
    """A fresh cache (no price table, semantic tier off): every panel says so plainly."""
    proxy = await make_proxy()
    admin = await make_admin(proxy)
    url = str(admin.make_url("/dashboard"))
    dom, _ = await asyncio.gather(
        dump_dom(tmp_path, url), screenshot(tmp_path, url, "dashboard-empty.png", 1280, 900)
    )

    assert "hidden" in dom.by_id("problem").attrs
    assert dom.by_id("hit-all").text() == "no traffic yet"
    assert dom.by_id("requests-all").text() == "0"
    assert dom.by_id("cost-saved").text() == "no price table"
    assert dom.by_id("vectors").text() == "off"
    for chart, note in (
        ("chart-hit-rate", "No traffic in the last 48 hours"),
        ("chart-savings", "Nothing saved in the last 48 hours"),
    ):
        svg = dom.by_id(chart)
        assert not svg.find_all("circle") and not svg.find_all("rect", "bar")
        assert [t.text() for t in svg.find_all("text", "empty-note")] == [note]
    assert "No traffic yet" in dom.by_id("outcomes").text()
    assert "No models seen yet" in dom.by_id("models").text()
    assert "No cached answers yet" in dom.by_id("top-entries").text()
    assert "Semantic tier off" in dom.by_id("near-misses").text()


@needs_chromium
async def test_dashboard_draws_the_stats_of_real_traffic(
    make_proxy: ProxyFactory,
    make_admin: AdminFactory,
    upstream: tuple[FakeUpstream, TestServer],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Tiles, charts, outcome mix, models, top entries and near misses show what /stats says."""
    prices = tmp_path / "prices.toml"
    await asyncio.to_thread(prices.write_text, PRICES)
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'dashboard.db'}"
    proxy = await make_proxy(
        db=db_url,
        embedder="efficientnet-lite0",
        embed_precision="fp32",
        pricing=prices,
        admin_token=TOKEN,
        max_image_pixels=200_000,
    )
    admin = await make_admin(proxy)
    before = await admin_json(client, admin, "/stats")
    await write_history(db_url, before["series"][-1]["hour"])
    ids = await send_traffic(client, proxy, upstream[0])

    # The page logs in with the token once (session cookie) and fetches stats with it.
    url = str(admin.make_url(f"/dashboard?token={TOKEN}"))
    for _ in range(2):  # once more if the clock hour turns while the browser reads the page
        stats = await admin_json(client, admin, "/stats")
        dom, *_ = await asyncio.gather(
            dump_dom(tmp_path, url),
            screenshot(tmp_path, url, "dashboard-1280x900.png", 1280, 900),
            screenshot(tmp_path, url, "dashboard-full.png", 1280, 1700),
            screenshot(tmp_path, url, "dashboard-narrow.png", 500, 2400),
        )
        after = await admin_json(client, admin, "/stats")
        if after["series"][0]["hour"] == stats["series"][0]["hour"]:
            break
    series = stats["series"]

    # Headline tiles.
    assert "hidden" in dom.by_id("problem").attrs
    assert dom.by_id("hit-all").text() == percent(stats["hit_rate"]["all"])
    assert dom.by_id("hit-5m").text() == percent(stats["hit_rate"]["5m"])
    assert dom.by_id("requests-all").text() == f"{stats['requests']['all']:,}"
    assert stats["currency"] == "USD"
    assert dom.by_id("cost-saved").text() == usd(stats["saved"]["cost"])
    assert dom.by_id("entries").text() == f"{stats['entries']['count']:,}"
    assert dom.by_id("vectors").text() == f"{stats['index']['vectors']:,}"
    assert stats["index"]["vectors"] > 0

    # Hit rate over time: one point per hour with traffic, at its rate, on one linear scale.
    rates = {h["hour"]: h["hit_rate"] for h in series if h["hit_rate"] is not None}
    assert len(rates) >= HISTORY_HOURS - len(IDLE_HOURS) + 1
    points = dom.by_id("chart-hit-rate").find_all("circle", "point")
    drawn = {int(p.attrs["data-hour"]): float(p.attrs["data-value"]) for p in points}
    assert drawn == rates
    # SVG y grows downwards: a higher rate is a smaller cy.
    assert_scaled([(float(p.attrs["data-value"]), -float(p.attrs["cy"])) for p in points], "rate")
    assert len(dom.by_id("chart-hit-rate").find_all("path", "hit-line")) == 2  # split at the gap

    # Savings over time: one bar per hour that saved tokens, heights in proportion; cost points.
    saved = {h["hour"]: h["saved_tokens"] for h in series if h["saved_tokens"]}
    bars = dom.by_id("chart-savings").find_all("rect", "bar")
    assert {int(b.attrs["data-hour"]): int(b.attrs["data-value"]) for b in bars} == saved
    assert_scaled(
        [(float(b.attrs["data-value"]), float(b.attrs["height"])) for b in bars], "tokens"
    )
    costs = dom.by_id("chart-savings").find_all("circle", "cost-point")
    assert len(costs) == sum(1 for h in series if h["saved_cost"])

    # Outcome mix: all six, with the ledger's counts.
    groups = dom.by_id("outcomes").find_all("g", "outcome")
    assert {g.attrs["data-outcome"]: int(g.attrs["data-value"]) for g in groups} == stats[
        "outcomes"
    ]
    assert all(stats["outcomes"][name] > 0 for name in stats["outcomes"])

    # Models, top entries (links by string id, thumbnails, escaped questions), near misses.
    rows = dom.by_id("models").find_all("tr", "model-row")
    assert [r.find_all("td")[0].text() for r in rows] == [m["model"] for m in stats["models"]]
    entries = dom.by_id("top-entries").find_all("tr", "entry-row")
    assert [e.attrs["data-entry"] for e in entries] == [e["id"] for e in stats["top_entries"]]
    by_id = {e.attrs["data-entry"]: e for e in entries}
    assert set(ids.values()) <= set(by_id)
    for entry in stats["top_entries"]:
        (link,) = by_id[entry["id"]].find_all("a", "question")
        assert (link.attrs["href"], link.text()) == (f"entries/{entry['id']}", entry["question"])
    assert by_id[ids["hostile"]].find_all("a", "question")[0].text() == HOSTILE_QUESTION
    assert not [e for e in dom.find_all("img") if e.attrs.get("src") == "x"]
    assert not dom.by_id("top-entries").find_all("b")
    assert dom.find_all("title")[0].text() != "pwned"
    thumbnail = f"entries/{ids['phone']}/images/0/thumbnail"
    assert [i.attrs["src"] for i in by_id[ids["phone"]].find_all("img")] == [thumbnail]
    # The receipt has no thumbnail: its 404 leaves a neutral placeholder, not a broken image.
    headers = {"Authorization": f"Bearer {TOKEN}"}
    missing = admin.make_url(f"/entries/{ids['receipt']}/images/0/thumbnail")
    async with client.get(missing, headers=headers) as response:
        assert response.status == 404
    assert not by_id[ids["receipt"]].find_all("img")
    assert by_id[ids["receipt"]].find_all("span", "thumb")
    assert by_id[ids["text"]].find_all("span", "thumb")[0].text() == "Aa"

    near = dom.by_id("near-misses").find_all("tr", "near-row")
    assert len(near) == len(stats["near_misses"]) >= 1
    rejected = [r for r in near if "verifier rejected" in r.text()]
    assert [a.attrs["href"] for r in rejected for a in r.find_all("a")][:1] == [
        f"entries/{ids['phone']}"
    ]
