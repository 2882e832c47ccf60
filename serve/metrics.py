"""`GET /metrics` in Prometheus' text format, as vLLM and llama-server expose theirs (prometheus_client).

Counters and histograms are the scraper's raw material: tokens per second is `rate(dovetail_generation_tokens_total)`,
τ is `rate(dovetail_generation_tokens_total) / rate(dovetail_target_forwards_total)`. The gauges read the queue when
scraped. Each app has a registry of its own, so several apps in one process do not share counts.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token, from a request's arrival (its queue wait included) to its first token.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("dovetail_requests_running", "Requests generating now.", registry=r).set_function(running)
        Gauge("dovetail_requests_waiting", "Requests queued for the model.", registry=r).set_function(waiting)
        self.requests = Counter("dovetail_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("dovetail_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter("dovetail_prompt_tokens_cached", "Prompt tokens whose K/V were reused.",
                                     registry=r)
        self.tokens = Counter("dovetail_generation_tokens", "Tokens generated (after the first of each request).",
                              registry=r)
        self.forwards = Counter("dovetail_target_forwards", "Target decode forwards; tokens / forwards is τ.",
                                registry=r)
        self.decode_seconds = Counter("dovetail_decode_seconds", "Time spent decoding (after the first token).",
                                      registry=r)
        self.ttft = Histogram("dovetail_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)

    def finished(self, reason: str, stats: dict, prompt_tokens: int) -> None:
        """Count one request from its generation stats (Stats.as_dict())."""
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(stats["cached_tokens"])
        self.tokens.inc(max(stats["new_tokens"] - 1, 0))
        self.forwards.inc(stats["target_forwards"])
        self.decode_seconds.inc(stats["decode_s"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
