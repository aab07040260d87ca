"""Model-server metrics, named after vLLM's where one exists (`vllm:` → `budrt:`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from budrt.server.model_pool import ModelPool

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

REQUESTS = Counter(
    "budrt:request_success_total", "Finished requests by finish reason", ["model_name", "finished_reason"]
)
REQUEST_ERRORS = Counter("budrt:request_errors_total", "Requests refused or failed", ["model_name", "status"])
PROMPT_TOKENS = Counter("budrt:prompt_tokens_total", "Prompt tokens processed", ["model_name"])
GENERATION_TOKENS = Counter("budrt:generation_tokens_total", "Tokens generated", ["model_name"])
TTFT = Histogram(
    "budrt:time_to_first_token_seconds", "Time to first token", ["model_name"], buckets=_LATENCY_BUCKETS
)
E2E = Histogram(
    "budrt:e2e_request_latency_seconds",
    "End-to-end request latency",
    ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
EMBEDDING_INPUTS = Counter("budrt:embedding_inputs_total", "Texts embedded", ["model_name"])


class EngineStatsCollector(Collector):
    """Reads live engine numbers (running, waiting, KV usage) at scrape time."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "budrt:num_requests_running", "Requests in the running batch", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            "budrt:num_requests_waiting", "Requests waiting to run", labels=["model_name"]
        )
        kv = GaugeMetricFamily(
            "budrt:kv_cache_usage_perc", "Fraction of KV cache in use", labels=["model_name"]
        )
        ready = GaugeMetricFamily("budrt:model_ready", "1 when the model can serve", labels=["model_name"])
        for name, hosted in self.pool.models.items():
            ready.add_metric([name], 1.0 if hosted.state == "ready" else 0.0)
            engine = hosted.stepping_engine
            if engine is None:
                continue
            stats = engine.stats()
            running.add_metric([name], float(stats.get("running", 0)))
            waiting.add_metric([name], float(stats.get("waiting", 0)))
            kv.add_metric([name], float(stats.get("kv_usage", 0.0)))
        yield from (running, waiting, kv, ready)
        yield from self._engine_counters_and_histograms()

    def _engine_counters_and_histograms(self) -> Iterator[Metric]:
        """Prefix-cache and preemption counters from `stats()`; latency histograms that only the
        engine can measure (queue time, inter-token latency) from its `histograms`."""
        counters = {
            "prefix_cache_queries": (
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            ),
            "prefix_cache_hits": ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache"),
            "num_preemptions": ("num_preemptions_total", "Sequences preempted (recomputed) for KV blocks"),
            "grammar_compiles": ("grammar_compiles_total", "Grammars compiled (schemas, regexes, tool sets)"),
            "grammar_cache_hits": (
                "grammar_cache_hits_total",
                "Constrained requests that found their grammar compiled already",
            ),
            "images_generated": ("images_generated_total", "Images generated"),
            "image_denoising_steps": ("image_steps_total", "Denoising steps run, one per image per step"),
            "image_unet_calls": ("unet_calls_total", "UNet calls (each serves one or more images' steps)"),
        }
        families = {
            key: CounterMetricFamily(f"budrt:{key}", doc, labels=["model_name"])
            for key, (_, doc) in counters.items()
        }
        histograms: dict[str, HistogramMetricFamily] = {}
        for name, hosted in self.pool.models.items():
            engine = hosted.stepping_engine
            if engine is None:
                continue
            stats = engine.stats()
            for key, (stat, _) in counters.items():
                if stat in stats:
                    families[key].add_metric([name], float(stats[stat]))
            for hname, hist in getattr(getattr(engine, "histograms", None), "items", dict)().items():
                family = histograms.setdefault(
                    hname,
                    HistogramMetricFamily(f"budrt:{hname}", hname.replace("_", " "), labels=["model_name"]),
                )
                buckets, total = hist.snapshot()
                family.add_metric([name], buckets, total)
        yield from families.values()
        yield from histograms.values()


def register_engine_collector(pool: ModelPool) -> None:
    REGISTRY.register(EngineStatsCollector(pool))
