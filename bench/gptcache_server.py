"""GPTCache behind HTTP, in front of an upstream model: the peer that ``vs_gptcache.py`` measures.

Run by the benchmark in its own process::

    python bench/gptcache_server.py --port P --upstream URL --data-dir DIR [--levels 1|2]

It is wired the way a GPTCache user would for "the same question about the same picture", through
GPTCache's own API (``gptcache`` 0.1.x) and nothing of vlcache's cache:

- ``Cache`` with ``get_data_manager(CacheBase("sqlite"), VectorBase("faiss"))``: SQLite for the
  questions and answers, a FAISS ``IDMap,Flat`` index (L2) for the vectors; eviction size raised
  past anything the benchmark stores (its default of 1,000 entries would evict the quality set);
- the embedding function is vlcache's own embedder (``load_embedder``, EfficientNet-Lite0 by
  default), fed the image decoded exactly as vlcache decodes it, so both caches see identical
  vectors;
- the pre-processing function keys on image + question: the question (model + text, whitespace
  collapsed, case-folded) is what GPTCache stores and compares, the image bytes are what it
  embeds;
- the similarity evaluation is GPTCache's ``SearchDistanceEvaluation`` (``max_distance`` 4, the
  default) behind a guard that scores 0 when the stored question differs (GPTCache searches one
  index for every question; vlcache partitions by question, so this keeps the two equivalent).
  FAISS returns the squared L2 distance d², which for unit vectors is ``2 - 2 cos``; the
  evaluation scores ``4 - d²`` out of 4 and GPTCache accepts ``score >= 4 x similarity_threshold``,
  so ``similarity_threshold = (1 + cos_t) / 2``: 0.85 for vlcache's cosine 0.70;
- ``top_k`` 3 (vlcache verifies up to 3 candidates), ``disable_report=True`` (otherwise every hit
  also INSERTs a report row and commits; vlcache batches its hit counters).

``--levels 2`` puts an exact tier in front, GPTCache's own multi-level way (``next_cache``): an
L1 ``Cache`` with the default in-memory map data manager, ``ExactMatchEvaluation`` and the
identity string embedding, keyed on question + sha256 of the image bytes.

Lookups and stores are GPTCache's ``adapter.api.get`` / ``put`` written out as the
``adapter.adapter.adapt`` calls they are, with one change: their callbacks after a lower level
answered return None, so with a ``next_cache`` every L2 hit reads as a miss and ``put`` fills
only the last level (0.1.44); here the answer is passed on. With one level, identical behaviour.

The HTTP glue is the same quality as vlcache's (orjson, pybase64, one aiohttp ``ClientSession``)
so that the comparison is of the caches, not of JSON or base64 libraries. GPTCache's calls are
synchronous (torch, FAISS, SQLAlchemy): they run in a thread pool of ``--workers`` threads, never
on the event loop. A hit answers the stored body with ``X-Cache: HIT`` and
``X-Cache-Match: exact`` (L1) or ``semantic`` (the vector path, byte-identical repeats included);
a miss goes upstream, and a complete answer (200, every ``finish_reason`` "stop") is ``put`` before
the response leaves, so it is visible to the next request. ``Cache-Control: no-cache`` skips the
lookup and ``no-store`` skips the ``put``, as vlcache does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pybase64
from aiohttp import ClientSession, ClientTimeout, web

READY_PATH = "/_gptcache/ready"
MAX_PIXELS = 40_000_000  # vlcache's --max-image-pixels default
TOP_K = 3
MAX_ENTRIES = 1_000_000
_SPACES = re.compile(r"\s+")
_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.ASCII)


def similarity_threshold(cosine: float) -> float:
    """GPTCache's ``similarity_threshold`` equivalent to a cosine threshold (see the docstring)."""
    return (1.0 + cosine) / 2.0


def cosine_of(score: float) -> float:
    """The cosine behind a search-distance score normalised to 0-1 (what ``hit_callback`` gets)."""
    return 2.0 * score - 1.0


@dataclass(frozen=True, slots=True)
class ChatKey:
    """What the cache keys a chat request on: its question and its one image."""

    question: str
    image: bytes


def parse_chat(body: bytes) -> ChatKey | None:
    """The question and image of an OpenAI chat request with one data-URI image, else None."""
    try:
        doc = orjson.loads(body)
        texts: list[str] = []
        images: list[bytes] = []
        for message in doc["messages"]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            texts.append(str(message.get("role", "")))
            for part in parts:
                if part["type"] == "text":
                    texts.append(part["text"])
                elif part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    prefix = _DATA_URI.match(url)
                    if prefix is None:
                        return None
                    images.append(pybase64.b64decode(url[prefix.end() :], validate=True))
                else:
                    return None
        if len(images) != 1:
            return None
        text = _SPACES.sub(" ", "\n".join(texts)).strip().casefold()
        return ChatKey(f"{doc.get('model', '')}\n{text}", images[0])
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
        return None


def complete(status: int, body: bytes) -> bool:
    """Whether an upstream answer is worth storing: 200 and every choice ended with "stop"."""
    if status != 200:
        return False
    try:
        choices = orjson.loads(body)["choices"]
        return bool(choices) and all(c.get("finish_reason") == "stop" for c in choices)
    except (KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
        return False


# --- GPTCache wiring ------------------------------------------------------------------------


def build_caches(
    data_dir: Path, embedder: Any, cosine: float, levels: int
) -> tuple[Callable[[ChatKey], tuple[str | None, str, float]], Callable[[ChatKey, str], None]]:
    """The lookup and store functions over GPTCache's top ``Cache`` (answer, match, cosine)."""
    from gptcache import Cache, Config
    from gptcache.adapter.adapter import adapt
    from gptcache.embedding.base import BaseEmbedding
    from gptcache.embedding.string import to_embeddings as identity_embedding
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.similarity_evaluation import ExactMatchEvaluation

    # The package's top-level names are factory functions; the class lives in its module.
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    from proxy.semantic import decode_picture

    class ImageEmbedding(BaseEmbedding):
        """vlcache's embedder on the image bytes, decoded as vlcache decodes them."""

        def to_embeddings(self, data: bytes, **_: Any) -> np.ndarray:
            image = decode_picture(data, MAX_PIXELS)
            vector: np.ndarray = embedder.embed([image])[0]
            return vector

        @property
        def dimension(self) -> int:
            return int(embedder.dim)

    class SameQuestionDistance(SearchDistanceEvaluation):
        """``SearchDistanceEvaluation``, but 0 for an entry of another question."""

        def evaluation(self, src_dict: dict, cache_dict: dict, **kwargs: Any) -> float:
            if src_dict["question"] != cache_dict["question"]:
                return 0.0
            return float(super().evaluation(src_dict, cache_dict, **kwargs))

    def image_and_question(data: dict[str, Any], **_: Any) -> tuple[str, bytes]:
        # (what GPTCache stores and compares, what it embeds)
        return data["prompt"], data["image"]

    def exact_key(data: dict[str, Any], **_: Any) -> str:
        return data["prompt"] + "\n" + hashlib.sha256(data["image"]).hexdigest()

    embedding = ImageEmbedding()
    data_manager = get_data_manager(
        CacheBase("sqlite", sql_url=f"sqlite:///{data_dir / 'gptcache.db'}"),
        VectorBase(
            "faiss",
            dimension=embedding.dimension,
            top_k=TOP_K,
            index_path=str(data_dir / "faiss.index"),
        ),
        max_size=MAX_ENTRIES,
    )
    similar = Cache()
    similar.init(
        pre_embedding_func=image_and_question,
        embedding_func=embedding.to_embeddings,
        data_manager=data_manager,
        similarity_evaluation=SameQuestionDistance(),
        config=Config(similarity_threshold=similarity_threshold(cosine), disable_report=True),
    )
    top = similar
    if levels == 2:
        top = Cache()
        top.init(
            pre_embedding_func=exact_key,
            embedding_func=identity_embedding,
            data_manager=get_data_manager(
                data_path=str(data_dir / "exact_map.pkl"), max_size=MAX_ENTRIES
            ),
            similarity_evaluation=ExactMatchEvaluation(),
            config=Config(disable_report=True),
            next_cache=similar,
        )

    def lookup(key: ChatKey) -> tuple[str | None, str, float]:
        seen: list[tuple[Any, float]] = []
        # What ``gptcache.adapter.api.get`` does, except for the callback after a lower level's
        # hit: ``get``'s returns None there, so with a ``next_cache`` every L2 hit would read as
        # a miss (0.1.44). This one passes the answer on without storing it in L1.
        answer = adapt(
            _no_model,
            _as_is,
            _pass_on,
            prompt=key.question,
            image=key.image,
            cache_obj=top,
            hit_callback=seen.extend,
        )
        if answer is None or not seen:
            return None, "", 0.0
        question, score = seen[0]
        if question != key.question:  # only L1's keys carry the image digest
            return str(answer), "exact", 1.0
        return str(answer), "semantic", cosine_of(score)

    def store(key: ChatKey, answer: str) -> None:
        # ``gptcache.adapter.api.put``, except for the callback: ``put``'s returns None, so with a
        # ``next_cache`` only the last level would keep the answer (0.1.44).
        adapt(
            lambda *_, **__: answer,
            _as_is,
            _store_and_pass_on,
            cache_skip=True,
            prompt=key.question,
            image=key.image,
            cache_obj=top,
        )

    return lookup, store


def _no_model(*_: Any, **__: Any) -> None:
    return None


def _as_is(data: Any) -> Any:
    return data


def _pass_on(answer: Any, update_cache: Any, *_: Any, **__: Any) -> Any:
    return answer


def _store_and_pass_on(answer: Any, update_cache: Any, *_: Any, **__: Any) -> Any:
    update_cache(answer)
    return answer


# --- HTTP --------------------------------------------------------------------------------------

LOOKUP: web.AppKey[Callable[[ChatKey], tuple[str | None, str, float]]] = web.AppKey("lookup")
STORE: web.AppKey[Callable[[ChatKey, str], None]] = web.AppKey("store")
POOL: web.AppKey[ThreadPoolExecutor] = web.AppKey("pool")
SESSION: web.AppKey[ClientSession] = web.AppKey("session")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")
_FORWARDED = ("Content-Type", "Authorization")


async def chat(request: web.Request) -> web.Response:
    """A cache lookup in the pool, else the upstream, then a ``put`` of a complete answer."""
    app = request.app
    body = await request.read()
    key = parse_chat(body)
    directives = request.headers.get("Cache-Control", "").lower()
    loop = asyncio.get_running_loop()
    if key is not None and "no-cache" not in directives:
        answer, match, cosine = await loop.run_in_executor(app[POOL], app[LOOKUP], key)
        if answer is not None:
            headers = {"X-Cache": "HIT", "X-Cache-Match": match}
            if match == "semantic":
                headers["X-Cache-Similarity"] = f"{cosine:.4f}"
            return web.Response(
                body=answer.encode(), content_type="application/json", headers=headers
            )
    forwarded = {h: request.headers[h] for h in _FORWARDED if h in request.headers}
    url = app[UPSTREAM] + request.path_qs
    async with app[SESSION].post(url, data=body, headers=forwarded) as upstream:
        raw = await upstream.read()
        status, content_type = upstream.status, upstream.content_type
    cache = "BYPASS" if key is None else "MISS"
    if key is not None and "no-store" not in directives and complete(status, raw):
        await loop.run_in_executor(app[POOL], app[STORE], key, raw.decode())
    return web.Response(
        body=raw, status=status, content_type=content_type, headers={"X-Cache": cache}
    )


async def ready(request: web.Request) -> web.Response:
    """Readiness probe of the benchmark harness."""
    return web.json_response({"ready": True})


def make_app(args: argparse.Namespace) -> web.Application:
    """The aiohttp app: GPTCache built once, its calls in a thread pool, one client session."""
    import torch

    from embeddings.embedder import load_embedder

    torch.set_num_threads(args.torch_threads)
    embedder = load_embedder(
        args.embedder, precision=args.precision, threads=args.torch_threads, runtime=args.runtime
    )
    cosine = embedder.default_threshold if args.threshold is None else args.threshold
    args.data_dir.mkdir(parents=True, exist_ok=True)
    lookup, store = build_caches(args.data_dir, embedder, cosine, args.levels)
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app[LOOKUP], app[STORE], app[UPSTREAM] = lookup, store, args.upstream.rstrip("/")

    async def resources(app: web.Application) -> Any:
        app[POOL] = ThreadPoolExecutor(args.workers, thread_name_prefix="gptcache")
        app[SESSION] = ClientSession(timeout=ClientTimeout(total=300))
        yield
        await app[SESSION].close()
        app[POOL].shutdown(wait=True)

    app.cleanup_ctx.append(resources)
    app.router.add_get(READY_PATH, ready)
    app.router.add_post("/{tail:.*}", chat)
    return app


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and serve until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the model endpoint")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--levels", type=int, choices=(1, 2), default=1)
    parser.add_argument("--embedder", default="efficientnet-lite0")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threshold", type=float, default=None, help="cosine; default: embedder's")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument(
        "--runtime", choices=("onnx", "torch"), default="onnx", help="the embedder's runtime"
    )
    parser.add_argument("--workers", type=int, default=2, help="threads running get/put")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    web.run_app(make_app(args), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
