"""The server's metrics, served at /metrics in Prometheus' text format (no client library needed).

Counters and histograms live in the HTTP process and are updated by the routes; the gauges are
read when scraped, per loaded model (queue and slots from its admission, KV-cache use from its
engine's last report). Every label has a bounded set of values: requests are counted by route
(``/v1/models/{model}``, not the path sent) and an unknown path is ``other``, so no client can
grow the series without bound.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

# Buckets in seconds: time to first token spans a cached short prompt to a long prefill on a
# small CPU; the time per output token spans a fast small model to a slow big one.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Counters and histograms of the requests served, and gauges read on demand."""

    def __init__(self, gauges: Callable[[], Dict[str, Dict[str, float]]]):
        self._gauges = gauges  # per model: gauge name -> value
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str], int] = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request_done(self, endpoint: str, status: int, prompt_tokens: int, completion_tokens: int,
                     seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.e2e.observe(seconds)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def tokens_after_first(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            with self._lock:
                self.tpot.observe(seconds / tokens)

    def render(self) -> str:
        """The exposition text (format 0.0.4)."""
        lines: List[str] = []

        def metric(name: str, kind: str, text: str, samples: Iterable[Tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        with self._lock:
            metric("ovchat_requests_total", "counter", "Requests answered, by route and HTTP status.",
                   [(f'{{endpoint="{_escape(e)}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("ovchat_prompt_tokens_total", "counter", "Prompt tokens of the requests answered.",
                   [("", self.prompt_tokens)])
            metric("ovchat_generation_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            for name, histogram, text in (
                    ("ovchat_time_to_first_token_seconds", self.ttft, "From a request's arrival to its first token."),
                    ("ovchat_time_per_output_token_seconds", self.tpot, "Seconds per token after the first."),
                    ("ovchat_request_duration_seconds", self.e2e, "From a request's arrival to its last byte.")):
                samples = []
                for bound, count in zip(histogram.buckets, histogram.counts):
                    samples.append((f'_bucket{{le="{_number(bound)}"}}', count))
                samples.append(('_bucket{le="+Inf"}', histogram.count))
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} histogram")
                lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)
                lines.append(f"{name}_sum {_number(histogram.sum)}")
                lines.append(f"{name}_count {histogram.count}")
        per_model = self._gauges()
        metric("ovchat_models_loaded", "gauge", "Models loaded now.", [("", len(per_model))])
        for name, text in (("ovchat_requests_running", "Requests generating now."),
                           ("ovchat_requests_waiting", "Requests waiting for a slot."),
                           ("ovchat_kv_cache_usage_ratio", "Share of the model's KV cache in use (0 to 1)."),
                           ("ovchat_kv_cache_bytes", "Bytes the model's KV cache holds."),
                           ("ovchat_model_memory_bytes", "Memory the model's engine process holds."),
                           ("ovchat_engine_restarts_total", "Times the model engine was restarted after a failure.")):
            kind = "counter" if name.endswith("_total") else "gauge"
            samples = [(f'{{model="{_escape(m)}"}}', gauges.get(name, 0.0)) for m, gauges in sorted(per_model.items())]
            metric(name, kind, text, samples or [("", 0.0)])
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
