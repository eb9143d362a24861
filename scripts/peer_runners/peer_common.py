"""The measuring protocol shared by the peer runners of scripts/bench_peers.py (standard library only).

A runner is started in a fresh process with the peer's own interpreter as
``python RUNNER.py REQUEST.json RESULT.json``. REQUEST holds the model path, the prompt and
warm-up token ids, the number of new tokens, the thread count and ``started`` (``time.time()``
in the parent just before the process started). The runner loads the model (timed as
``load_s``, library imports excluded), generates ``warmup_new_tokens`` greedy tokens from the
warm-up ids (the first token of this first generation ends ``cold_start_s``), then exactly
``new_tokens`` greedy tokens from the prompt ids, timing each new token as the peer hands it
over. This is the protocol of ``ovchat bench`` (ovchat/bench.py), so the figures compare.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Callable, Dict, List


class TokenClock:
    """Times the new tokens of one generation: call ``start()`` just before it, ``tick()`` per token."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.ticks: List[float] = []
        self.first_wall = 0.0

    def start(self) -> None:
        self.ticks = []
        self.begin = time.perf_counter()

    def tick(self, count: int = 1) -> None:
        now = time.perf_counter()
        if not self.ticks:
            self.first_wall = time.time()
        self.ticks.extend([now] * count)

    def ttft_s(self) -> float:
        return self.ticks[0] - self.begin

    def decode_tokens_per_s(self) -> float:
        # Tokens after the first, over the time from the first to the last (GenAI's TPOT basis).
        if len(self.ticks) < 2 or self.ticks[-1] == self.ticks[0]:
            return 0.0
        return (len(self.ticks) - 1) / (self.ticks[-1] - self.ticks[0])


def peak_rss_bytes() -> int:
    """VmHWM on Linux, as ovchat.bench measures it (ru_maxrss survives exec: a runner started by a
    big parent would report the parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(load: Callable[[dict], object], generate: Callable[[object, List[int], int, TokenClock], List[int]],
         versions: Callable[[], Dict[str, str]], detokenize: Callable[[object, List[int]], str]) -> int:
    """Run the protocol with a peer's ``load(request) -> model`` and
    ``generate(model, ids, n, clock) -> new token ids`` (ticking ``clock`` once per new token)."""
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    begin = time.perf_counter()
    model = load(request)
    load_s = time.perf_counter() - begin

    clock = TokenClock()
    generate(model, request["warmup_ids"], request["warmup_new_tokens"], clock)
    cold_start_s = clock.first_wall - request["started"]

    clock = TokenClock()
    tokens = generate(model, request["prompt_ids"], request["new_tokens"], clock)
    result = {
        "load_s": load_s,
        "cold_start_s": cold_start_s,
        "ttft_s": clock.ttft_s(),
        "decode_tokens_per_s": clock.decode_tokens_per_s(),
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens": len(request["prompt_ids"]),
        "generated_tokens": len(tokens),
        "timed_tokens": len(clock.ticks),
        "text_head": detokenize(model, tokens)[:200],
        "versions": versions(),
    }
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0
