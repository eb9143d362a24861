"""How fairly `ovchat serve`'s engine shares the CPU while a long prompt is prefilled.

One stream is generating when a long prompt (5,000 tokens by default) arrives, and half a second
later a short one (15 tokens). Measured on the real engine (ovchat.server.engine.Engine, the
code the engine process runs), in this process, with the model's real weights: the running
stream's gaps between tokens while the long prompt is prefilled (p50, p99, worst), the short
prompt's time to its first token, and the long one's. Each configuration of prefill chunk and
turn size is a fresh engine; one JSON line each.

    python scripts/bench_fairness.py -m smollm2-135m --chunks 64,128,256 --turns 0,512,1024
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time


def measure(model, chunk: int, turn: int, long_tokens: int) -> dict:
    from ovchat.devices import CPU_ACCURACY
    from ovchat.options import GenerationSettings
    from ovchat.server import engine as engine_module, protocol
    from ovchat.server.engine import Engine, EngineSpec

    engine_module.TURN_TOKENS = turn if turn else 10 ** 9  # 0: the whole prompt at once, as GenAI does
    engine = Engine(EngineSpec(model, "CPU", dict(CPU_ACCURACY), max_running=4, kv_cache_gb=0, prefill_chunk=chunk))
    rng = random.Random(1)

    def ids(n):
        return tuple(rng.randrange(100, 40000) for _ in range(n))

    engine.add(protocol.Add(1, ids(20), GenerationSettings.forced(4000)))
    gaps, last, t0 = [], None, time.perf_counter()
    long_at = short_at = long_first = short_first = None
    while long_first is None or short_first is None:
        updates = engine.step()
        now = time.perf_counter()
        for update in updates:
            got = sum(len(t.ids) for t in update.outputs.values())
            if not got:
                continue
            if update.rid == 1:
                if last is not None and long_at is not None and long_first is None:
                    gaps.append(now - last)
                last = now
            elif update.rid == 2 and long_first is None:
                long_first = now - long_at
            elif update.rid == 3 and short_first is None:
                short_first = now - short_at
        if long_at is None and now - t0 > 1.0:
            engine.add(protocol.Add(2, ids(long_tokens), GenerationSettings.forced(4)))
            long_at = now
        if long_at is not None and short_at is None and now - long_at > 0.5:
            engine.add(protocol.Add(3, ids(15), GenerationSettings.forced(4)))
            short_at = now
    for rid in (1, 2, 3):
        engine.cancel(rid)
    while engine.busy:  # let the pipeline release what the cancelled requests held
        engine.step()
    gaps.sort()
    return {"prefill_chunk": chunk, "turn_tokens": turn, "long_prompt": long_tokens,
            "gap_p50_ms": round(statistics.median(gaps) * 1000), "gap_p99_ms": round(gaps[int(0.99 * (len(gaps) - 1))] * 1000),
            "gap_max_ms": round(gaps[-1] * 1000), "short_ttft_s": round(short_first, 2), "long_ttft_s": round(long_first, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="a store name, a directory or a .gguf (default model)")
    parser.add_argument("--chunks", default="64,128,256", help="prefill chunks (max_num_batched_tokens) to try")
    parser.add_argument("--turns", default="0,512", help="turn sizes to try (0: the whole prompt at once)")
    parser.add_argument("--long-tokens", type=int, default=5000)
    args = parser.parse_args(argv)
    from ovchat.store import resolve_model

    model = resolve_model(args.model)
    for chunk in (int(c) for c in args.chunks.split(",")):
        for turn in (int(t) for t in args.turns.split(",")):
            print(json.dumps(measure(model, chunk, turn, args.long_tokens)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
