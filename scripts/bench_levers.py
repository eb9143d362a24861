#!/usr/bin/env python3
"""What the decoding levers buy on real text: prompt lookup and a draft model against plain decoding.

    python scripts/bench_levers.py -m smollm2-135m                       # prompt lookup, defaults only
    python scripts/bench_levers.py -m smollm2-135m --grid                # candidates x n-gram sizes
    python scripts/bench_levers.py -m MODEL --draft DRAFT --draft-tokens 2,3,5 --runs 5 --json

Each configuration is a ``ChatSession`` (the product's own path) on the CPU, loaded afresh for each
round and released after it (pipelines loaded side by side would compete for the cores with their
thread pools); the rounds go over every configuration, so a change in machine load hits them
alike, and the first round is a warm-up that is not counted. Every reply is greedy and at most
--new-tokens long. Reported per task, as medians: the reply's tokens per second (prefill
included: what the user waits for), the speed-up over plain decoding, the tokens each call of the
model produced (``TurnMetrics.tokens_per_step``: 1 + the proposals it accepted), the acceptance
(accepted proposals over the proposal slots, candidates per step) and whether the reply is
token for token the plain one (speculation must never change a greedy reply).

The tasks: three input-grounded ones (edit a given text, summarise it, answer from it), where the
reply repeats its input and prompt lookup can pay, and two free-chat ones, where it cannot.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional, Tuple

ARTICLE = (
    "The Point Sur lighthouse stands on a volcanic rock 361 feet above the Pacific Ocean, on the coast "
    "of California. It was first lit on August 1, 1889, after ships had run aground on the rocks for "
    "decades. Its first-order Fresnel lens, made in France, could be seen 23 miles out to sea. Four "
    "keepers and their families lived on the rock in a stone house beside the tower. They carried "
    "supplies up a steep path, kept the lamp burning through the night, and wound the clockwork that "
    "turned the lens every few hours. In 1972 the light was automated and the last keeper left. "
    "Today volunteers lead tours of the station, and the lens is on display in a museum in the town "
    "of Monterey.")
TYPOS = ARTICLE.replace("volcanic", "volcanik").replace("decades", "decads").replace("families", "familys") \
    .replace("through", "thru").replace("automated", "automatted")
TASKS: Dict[str, Tuple[str, str]] = {  # name -> (kind, prompt)
    "edit": ("grounded", f"Correct the spelling mistakes in this text and write it out in full:\n\n{TYPOS}"),
    "summarise": ("grounded", f"Summarise this text in three sentences:\n\n{ARTICLE}"),
    "answer": ("grounded", f"{ARTICLE}\n\nFrom the text above: who lived on the rock, and what did they do? "
                           "Answer with the text's own words."),
    "story": ("free", "Write a short story about a robot who learns to paint."),
    "explain": ("free", "Explain how a refrigerator keeps food cold."),
}


def configurations(args) -> Dict[str, object]:
    from ovchat.speculation import DEFAULT_CANDIDATES, DEFAULT_NGRAM, Speculation

    configs: Dict[str, object] = {"plain": None}
    lookup = [(k, n) for k in (3, 5, 8) for n in (2, 3)] if args.grid else [(DEFAULT_CANDIDATES, DEFAULT_NGRAM)]
    for k, n in lookup:
        configs[f"lookup k={k} n={n}"] = Speculation("prompt-lookup", candidates=k, ngram=n)
    if args.draft:
        from ovchat.store import resolve_model

        draft = resolve_model(args.draft)
        for k in ([int(k) for k in args.draft_tokens.split(",")] if args.draft_tokens else
                  (2, 3, 5) if args.grid else (DEFAULT_CANDIDATES,)):
            configs[f"draft k={k}"] = Speculation("draft", candidates=k, draft=draft)
    return configs


def median(values: List[float]) -> float:
    return statistics.median(values) if values else 0.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None, help="a store name, a model directory or a .gguf file")
    parser.add_argument("--draft", default=None, help="a draft model (same tokenizer) for the draft lever")
    parser.add_argument("--grid", action="store_true", help="several candidate counts and n-gram sizes")
    parser.add_argument("--draft-tokens", default="", help="candidate counts to try with --draft (e.g. 2,3,5)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import openvino_genai

    from ovchat.session import ChatSession
    from ovchat.store import resolve_model

    model = resolve_model(args.model)
    tasks = [t for t in args.tasks.split(",") if t]
    configs = configurations(args)
    samples: Dict[Tuple[str, str], List[dict]] = {(c, t): [] for c in configs for t in tasks}
    for round_ in range(args.runs + 1):
        for name, spec in configs.items():
            session = ChatSession(model, device="CPU", speculation=spec)
            for task in tasks:
                session.reset()
                text = session.send(TASKS[task][1], max_new_tokens=args.new_tokens)
                m = session.last_metrics
                if round_:
                    samples[(name, task)].append({"text": str(text), "tokens": m.generated_tokens,
                                                  "generate_s": m.generate_s, "tokens_per_step": m.tokens_per_step})
            del session
            gc.collect()
        print(f"bench_levers: round {round_}/{args.runs} done", file=sys.stderr)

    rows = []
    for task in tasks:
        plain = samples[("plain", task)]
        plain_s = median([s["generate_s"] for s in plain])
        for name, spec in configs.items():
            runs = samples[(name, task)]
            seconds = median([s["generate_s"] for s in runs])
            tps = median([s["tokens_per_step"] or 1.0 for s in runs])
            k = spec.candidates if spec is not None else 0
            rows.append({"task": task, "kind": TASKS[task][0], "config": name, "tokens": runs[0]["tokens"],
                         "tokens_per_s": runs[0]["tokens"] / seconds if seconds else 0.0,
                         "speedup": plain_s / seconds if seconds else 0.0, "tokens_per_step": tps,
                         "acceptance": (tps - 1) / k if k else None,
                         "same_output": all(s["text"] == plain[0]["text"] for s in runs)})
    report = {"model": str(model), "draft": args.draft, "new_tokens": args.new_tokens, "runs": args.runs,
              "date": datetime.date.today().isoformat(), "cpu": _cpu(), "cores": os.cpu_count(),
              "python": platform.python_version(), "openvino_genai": openvino_genai.__version__, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} ({report['cpu']}, {report['cores']} CPUs, GenAI {report['openvino_genai']}, "
          f"{report['date']}): greedy, up to {args.new_tokens} new tokens, median of {args.runs} runs")
    print(f"{'task':<10} {'config':<16} {'tokens':>6} {'tok/s':>7} {'speed-up':>8} {'tok/step':>8} "
          f"{'accept':>6}  same")
    for r in rows:
        accept = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else ""
        print(f"{r['task']:<10} {r['config']:<16} {r['tokens']:>6} {r['tokens_per_s']:>7.1f} {r['speedup']:>7.2f}x "
              f"{r['tokens_per_step']:>8.2f} {accept:>6}  {'yes' if r['same_output'] else 'NO'}")
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
