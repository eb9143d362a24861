#!/usr/bin/env python3
"""Compare ways of storing one model's weights: size, accuracy and speed, side by side.

    python scripts/bench_recipes.py SOURCE [--recipes keep,int4,fp16] [--runs 3] [--json]
    python scripts/bench_recipes.py --preset phi3-mini-4k /tmp/phi3-random --recipes int4,int4-r1,int4-pc,int8

SOURCE is a Hugging Face directory or a .gguf (with --preset, a random checkpoint of that
preset's shape, written first if missing). Each recipe converts SOURCE once (the conversion's
accuracy receipt forced on), then, for each recipe:

- size: openvino_model.bin on disk;
- receipt: top-1 agreement and mean KL of the converted weights against the float weights,
  teacher-forced over the receipt text in exact float32 (ovchat.convert.receipt);
- runtime agreement: the same comparison with the converted model compiled as ovchat runs it on
  this CPU (ovchat.devices.compile_properties), so what the runtime's precision costs shows too;
- load, time to first token, decode speed and peak RSS: `ovchat bench`'s fresh-process runs
  (84-token prompt, 128 forced new tokens), the recipes interleaved run by run so that a busy
  moment of the machine does not fall on one recipe only; medians.

Recipes: keep (a quantized GGUF's own blocks), int4 (the mission's: sym, group 128, ratio 0.6),
int4-r1 (ratio 1.0), int4-pc (ratio 1.0, one group per output channel), int8, fp16.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint  # noqa: E402  (a sibling script)

RECIPES = {
    "keep": dict(weight_format="keep"),
    "int4": dict(weight_format="int4"),
    "int4-r1": dict(weight_format="int4", ratio=1.0),
    "int4-pc": dict(weight_format="int4", ratio=1.0, group_size=-1),
    "int8": dict(weight_format="int8", sym=False),
    "fp16": dict(weight_format="fp16"),
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    flags = open("/proc/cpuinfo").read()
                    isa = "AMX" if "amx_int8" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
                    return f"{name}, {os.cpu_count()} cores, {isa}"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def runtime_agreement(model_dir: Path, reference_logits) -> tuple:
    """Agreement of ``model_dir`` compiled with ovchat's CPU properties with the float weights."""
    import numpy as np
    import openvino as ov

    from ovchat.convert import receipt
    from ovchat.devices import DeviceChoice, compile_properties

    ids = receipt.token_ids(model_dir)
    props = compile_properties(DeviceChoice("CPU", "bench", False), None)
    compiled = ov.Core().compile_model(model_dir / "openvino_model.xml", "CPU", props)
    n = ids.shape[1]
    got = np.array(compiled.create_infer_request().infer({
        "input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, np.int32)})["logits"][0])
    return receipt.compare(reference_logits, got)


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("--preset", choices=sorted(make_checkpoint.PRESETS))
    parser.add_argument("--recipes", default="keep,int4,fp16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, help="where the converted models go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if args.preset and not args.source.exists():
        with contextlib.redirect_stdout(sys.stderr):
            make_checkpoint.main(["--arch", make_checkpoint.PRESETS[args.preset][0], "--preset", args.preset,
                                  str(args.source)])

    from ovchat.bench import measure_in_fresh_process, versions
    from ovchat.convert import Recipe, convert, read_manifest, receipt
    from ovchat.convert.sources import open_checkpoint
    from ovchat.convert.models import build_model

    work = args.work or Path(tempfile.mkdtemp(prefix="ovchat-recipes-"))
    rows: Dict[str, dict] = {}
    for name in recipes:
        out = work / name
        print(f"converting with {name}", file=sys.stderr)
        convert(args.source, out, recipe=Recipe(**RECIPES[name]), force=True, receipt=True)
        manifest = read_manifest(out)
        rows[name] = {"bin_bytes": (out / "openvino_model.bin").stat().st_size, "receipt": manifest["receipt"],
                      "runs": []}
        # Figures go to stderr as they come, so an interrupted comparison still leaves them.
        print(f"{name}: {rows[name]['bin_bytes'] / 1e6:.0f} MB, receipt {manifest['receipt']}", file=sys.stderr)
    print("the float reference's logits", file=sys.stderr)
    first = work / recipes[0]
    reference = receipt.logits(build_model(open_checkpoint(args.source).float_view()), receipt.token_ids(first))
    for name in recipes:
        agree, kl = runtime_agreement(work / name, reference)
        rows[name]["runtime"] = {"top1_agreement": round(agree, 4), "mean_kl": float(f"{kl:.3g}")}
        print(f"{name}: runtime {rows[name]['runtime']}", file=sys.stderr)
    for run in range(args.runs + 1):  # run 0 warms the page cache and is not counted
        for name in recipes:
            print(f"run {run} of {args.runs}: {name}", file=sys.stderr)
            sample = measure_in_fresh_process(str(work / name), "CPU", 84, 128)
            print(f"{name}: {dataclasses.asdict(sample)}", file=sys.stderr)
            if run:
                rows[name]["runs"].append(dataclasses.asdict(sample))
    for row in rows.values():
        row["median"] = {k: statistics.median(r[k] for r in row["runs"])
                         for k in ("load_s", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes", "cold_start_s")}
    result = {"source": str(args.source), "cpu": cpu_name(), "versions": versions(), "recipes": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.source} on {result['cpu']}; {', '.join(f'{k} {v}' for k, v in result['versions'].items())}")
    print("| recipe | size | receipt top-1 / KL | runtime top-1 / KL | load | TTFT | decode | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        m, r, rt = row["median"], row["receipt"], row["runtime"]
        print(f"| {name} | {row['bin_bytes'] / 1e6:.0f} MB | {100 * r['top1_agreement']:.1f}% / {r['mean_kl']:.3g} | "
              f"{100 * rt['top1_agreement']:.1f}% / {rt['mean_kl']:.3g} | {m['load_s']:.2f} s | "
              f"{1000 * m['ttft_s']:.0f} ms | {m['decode_tokens_per_s']:.1f} tok/s | {m['peak_rss_bytes'] / 1e6:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
