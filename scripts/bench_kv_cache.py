#!/usr/bin/env python3
"""What the CPU's KV-cache precision costs and saves: greedy decoding with the cache in u8 (the
CPU plugin's default for compressed models), f16 and f32, on one model, in one process each.

    python scripts/bench_kv_cache.py MODEL_DIR [--new-tokens 128] [--runs 3] [--json]

Each precision decodes the same chat-templated prompt (ovchat.bench.prompt_ids, 84 tokens) for
exactly --new-tokens greedy tokens, with ovchat's other CPU properties. Reported per precision:
decode speed (median over --runs fresh processes) and how far its tokens follow the f32 cache's
(the first divergence and the share of positions that agree). A cache precision is only worth
adopting where the tokens follow f32's and the speed does not drop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Dict, List

PRECISIONS = ("u8", "f16", "f32")


def one_run(model: str, precision: str, new_tokens: int) -> Dict[str, object]:
    """In this process: load with the given KV-cache precision, decode, return tokens and speed."""
    import time

    import numpy as np
    import openvino as ov
    import openvino_genai

    from ovchat.bench import forced_config, prompt_ids
    from ovchat.loading import plan

    loaded = plan(model, device="CPU")
    props = {**loaded.properties(loaded.device), "KV_CACHE_PRECISION": precision}
    pipe = openvino_genai.LLMPipeline(str(loaded.model_path), "CPU", **props)
    ids = ov.Tensor(np.array([prompt_ids(pipe.get_tokenizer(), 84)], dtype=np.int64))
    pipe.generate(ids, forced_config(pipe, 4))  # first inference: weight repacking, not timed
    ticks: List[float] = []

    def streamer(token: int) -> bool:
        ticks.append(time.perf_counter())
        return False

    result = pipe.generate(ids, forced_config(pipe, new_tokens), streamer)
    tokens = [int(t) for t in result.tokens[0]]
    speed = (len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 else 0.0
    return {"tokens": tokens, "decode_tokens_per_s": speed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model, args.child, args.new_tokens)))
        return 0
    samples: Dict[str, List[dict]] = {p: [] for p in PRECISIONS}
    for _ in range(args.runs):  # interleaved, so a busy moment does not fall on one precision only
        for precision in PRECISIONS:
            done = subprocess.run([sys.executable, __file__, args.model, "--child", precision,
                                   "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
            samples[precision].append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = samples["f32"][0]["tokens"]
    report = {}
    for precision, got in samples.items():
        tokens = got[0]["tokens"]
        same = [a == b for a, b in zip(tokens, reference)]
        report[precision] = {
            "decode_tokens_per_s": round(statistics.median(s["decode_tokens_per_s"] for s in got), 2),
            "first_divergence": same.index(False) if False in same else None,
            "agreement": round(sum(same) / len(reference), 4),
        }
    # The floor: does f32 follow itself from one process to the next? (Threads may sum differently.)
    repeat = samples["f32"][-1]["tokens"] == reference
    if args.json:
        print(json.dumps({"model": args.model, "new_tokens": args.new_tokens, "precisions": report,
                          "f32_repeats_itself": repeat}, indent=2))
        return 0
    print(f"{args.model}: {args.new_tokens} greedy tokens after an 84-token prompt, median of {args.runs}")
    print(f"  (f32 in another process {'gives the same tokens' if repeat else 'gives different tokens'})")
    for precision, r in report.items():
        div = "never" if r["first_divergence"] is None else f"at token {r['first_divergence']}"
        print(f"  KV cache {precision:>3}: {r['decode_tokens_per_s']:6.1f} tok/s, "
              f"follows f32 for {100 * r['agreement']:.1f}% of tokens, diverges {div}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
