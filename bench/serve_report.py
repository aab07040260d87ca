"""Render a `serve_bench.py` result: a plain-text table and a markdown snippet with issue 3's targets."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
)
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def _rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    serving = result.get("serving", {})
    rows = [(f"closed loop c={c}", s) for c, s in serving.get("closed_loop", {}).items()]
    rows += [(f"open loop {r} req/s", s) for r, s in serving.get("open_loop", {}).items()]
    return rows


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def serving_table(result: dict[str, Any]) -> list[str]:
    head = ["case", "ok/fail"] + [c[0] for c in COLUMNS]
    head += [f"{m.removesuffix('_ms').upper()} mean/p50/p90/p99 (ms)" for m in LATENCIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in _rows(result):
        cells = [name, f"{s['completed']}/{s['failed']}"] + [fmt.format(s[key]) for _, key, fmt in COLUMNS]
        cells += ["/".join(_fmt(s[m][q]) for q in ("mean", "p50", "p90", "p99")) for m in LATENCIES]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def baseline_table(result: dict[str, Any]) -> list[str]:
    b = result.get("baselines", {})
    lines = ["| baseline | requests | out tok/s | total tok/s |", "|---|---:|---:|---:|"]
    for key, label in (("hf_single", "transformers generate, 1 at a time"), ("hf_static_batch", "")):
        if key in b:
            s = b[key]
            label = label or f"transformers generate, static batches of {s['batch_size']} (run to longest)"
            lines.append(
                f"| {label} ({b.get('hf_dtype')}) | {s['requests']} | {s['output_throughput']:.1f} "
                f"| {s['total_token_throughput']:.1f} |"
            )
    if roof := b.get("roofline"):
        lines.append(
            f"| roofline: {roof['matmul_gflops']:.0f} GFLOP/s {roof['dtype']} matmul / (2 x "
            f"{roof['parameters'] / 1e6:.1f} M params) | | | {roof['tokens_per_s']:.0f} |"
        )
        after = result.get("serving", {}).get("closed_loop", {}).get("64", {}).get("matmul_gflops_after")
        if after:
            lines.append(
                f"| roofline right after the c=64 phase: {after:.0f} GFLOP/s | | | "
                f"{after * 1e9 / (2 * roof['parameters']):.0f} |"
            )
    return lines


def roofline_tokens(result: dict[str, Any]) -> float | None:
    """The roofline's tokens/s: the higher of its two readings (end of run, right after c=64)."""
    roof = result.get("baselines", {}).get("roofline")
    if not roof:
        return None
    after = result.get("serving", {}).get("closed_loop", {}).get("64", {}).get("matmul_gflops_after", 0.0)
    return max(roof["matmul_gflops"], after) * 1e9 / (2 * roof["parameters"])


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for issue 3's targets; met is None where the run lacks the data."""
    closed = result.get("serving", {}).get("closed_loop", {})
    b = result.get("baselines", {})
    c64, c16, c1 = closed.get("64"), closed.get("16"), closed.get("1")
    out: list[tuple[str, str, bool | None]] = []
    if c64 and "hf_static_batch" in b:
        ratio = c64["output_throughput"] / b["hf_static_batch"]["output_throughput"]
        out.append(("output tok/s @ c=64 >= 4x static batch", f"{ratio:.2f}x", ratio >= 4))
    if c64 and (roof := roofline_tokens(result)):
        frac = c64["total_token_throughput"] / roof
        out.append(("total tok/s @ c=64 >= 50% of roofline (the higher reading)", f"{frac:.0%}", frac >= 0.5))
    if c1 and c1["tpot_ms"]["mean"] == c1["tpot_ms"]["mean"]:
        rate = 1000 / c1["tpot_ms"]["mean"]
        out.append(
            ("single-stream decode >= 70 tok/s (1 / mean TPOT @ c=1)", f"{rate:.1f} tok/s", rate >= 70)
        )
    if c16:
        p50 = c16["ttft_ms"]["p50"]
        out.append(("TTFT p50 @ c=16 <= 1 s", f"{p50:.0f} ms", p50 <= 1000))
    if prefix := result.get("serving", {}).get("prefix_cache"):
        speedup = prefix["ttft_p50_speedup"]
        out.append(
            (
                f"shared {prefix['prompt_tokens']}-token prefix cuts TTFT >= 5x",
                f"{speedup:.1f}x",
                speedup >= 5,
            )
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    w = result["workload"]
    lines = [
        f"Run of {result['started']} (`{result['command']}`), {m['cpu']}, nproc={m['nproc']}, "
        f"torch {m['torch']}, engine dtype {m['engine_dtype']}, load average {m['loadavg_1m']:.1f} at "
        f"start / {m['loadavg_1m_end']:.1f} at end. Workload: {w['requests']} requests, mean prompt "
        f"{w['mean_prompt_tokens']:.0f} tokens, mean output {w['mean_output_tokens']:.0f} tokens.",
        "",
        *serving_table(result),
        "",
    ]
    if prefix := result.get("serving", {}).get("prefix_cache"):
        lines += [
            f"Prefix cache ({prefix['prompt_tokens']}-token prompts, one at a time): TTFT p50 "
            f"{prefix['unique']['ttft_ms']['p50']:.0f} ms with unique prefixes, "
            f"{prefix['shared']['ttft_ms']['p50']:.0f} ms with a shared one "
            f"({prefix['ttft_p50_speedup']:.1f}x).",
            "",
        ]
    lines += [*baseline_table(result), ""]
    if checks := targets(result):
        lines += ["| target | measured | met |", "|---|---:|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else 'no'} |" for t, v, ok in checks]
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any]) -> None:
    print()
    for line in serving_table(result) + [""] + baseline_table(result):
        print(line)
