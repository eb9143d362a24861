#!/usr/bin/env python3
"""A second `ovchat run` both ways: answered by a running `ovchat serve` (the warm path) or
loading the model in its own process (--no-server).

    python scripts/bench_warm_path.py -m smollm2-135m --runs 5
    python scripts/bench_warm_path.py -m phi-3-mini-4k-instruct --max-new-tokens 16 --json

Starts `ovchat serve` on a free loopback port, waits until it is ready, then times whole
`ovchat run` processes (interpreter start to exit, as a user at a shell sees it) alternating
between the two ways, after one warm-up run of each that is not counted. Also reports each way's
time to the first byte of the reply on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Optional

QUESTION = "What is the capital of France? Answer in one sentence."


def start_server(model: str) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "ovchat.cli", "serve", "-m", model, "--device", "CPU",
                               "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = None
    for line in server.stderr:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        raise SystemExit("bench_warm_path: the server did not start")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("bench_warm_path: the server never became ready")


def one_run(model: str, warm: bool, max_new_tokens: int) -> Dict[str, float]:
    cmd = [sys.executable, "-m", "ovchat.cli", "run", "-m", model, "--device", "CPU",
           "--max-new-tokens", str(max_new_tokens), QUESTION]
    if not warm:
        cmd.insert(4, "--no-server")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - start
    rest, err = proc.communicate()
    total = time.perf_counter() - start
    if proc.returncode != 0 or not first:
        raise SystemExit(f"bench_warm_path: ovchat run failed: {err.decode(errors='replace')[-500:]}")
    used_server = b"ovchat serve" in err
    if used_server != warm:
        raise SystemExit(f"bench_warm_path: expected warm={warm}, stderr says otherwise: {err.decode()[-300:]}")
    return {"wall_s": total, "first_byte_s": first_byte}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    env_model = args.model
    server = start_server(env_model)
    samples: Dict[str, List[Dict[str, float]]] = {"warm": [], "cold": []}
    try:
        for round_ in range(args.runs + 1):
            for way in ("warm", "cold"):
                sample = one_run(env_model, way == "warm", args.max_new_tokens)
                if round_:
                    samples[way].append(sample)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    summary = {way: {k: statistics.median(s[k] for s in runs) for k in ("wall_s", "first_byte_s")}
               for way, runs in samples.items()}
    report = {"model": args.model, "runs": args.runs, "max_new_tokens": args.max_new_tokens,
              "cpus": os.cpu_count(), "samples": samples, "median": summary}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.model}: `ovchat run` with up to {args.max_new_tokens} new tokens, median of {args.runs}")
        for way, label in (("warm", "a running ovchat serve answers"), ("cold", "--no-server (loads the model)")):
            m = summary[way]
            print(f"  {label:<32} first byte {m['first_byte_s']:.2f} s, whole run {m['wall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
