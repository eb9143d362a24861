#!/usr/bin/env python3
"""Measure one `ovchat convert`: wall time, peak RSS, output size and bitwidths, as JSON on stdout.

    python scripts/bench_convert.py SOURCE OUTPUT [CONVERT OPTIONS...]
    python scripts/bench_convert.py --preset phi3-mini-4k /tmp/phi3-random /tmp/phi3-int4

With --preset, SOURCE is first written by make_checkpoint.py if it does not exist (in this
process, so it counts neither in the time nor in the peak). The conversion runs as `ovchat
convert` in a child process; its peak RSS is the child's ru_maxrss. On a shared machine a wall
time means little without the load, so the CPU time other processes used during the run is
reported too. Linux only (ru_maxrss in KiB, /proc/stat).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_checkpoint  # noqa: E402  (a sibling script)


def busy_cpu_seconds() -> float:
    """CPU time spent busy by all processes since boot."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in stat.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--preset", choices=sorted(make_checkpoint.PRESETS),
                        help="write SOURCE with this preset's config and random weights if it is missing")
    args, convert_options = parser.parse_known_args(argv)

    if args.preset and not args.source.exists():
        arch = make_checkpoint.PRESETS[args.preset][0]
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            make_checkpoint.main(["--arch", arch, "--preset", args.preset, str(args.source)])

    command = [sys.executable, "-m", "ovchat.cli", "convert", str(args.source), str(args.output),
               *convert_options]
    load_before, busy_before, started = os.getloadavg(), busy_cpu_seconds(), time.monotonic()
    status = subprocess.run(command, stdout=sys.stderr).returncode  # stdout carries only the JSON
    wall, busy = time.monotonic() - started, busy_cpu_seconds() - busy_before
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "command": command,
        "exit_status": status,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(child.ru_maxrss * 1024 / 1e9, 2),
        "cpu_s": round(child.ru_utime + child.ru_stime, 1),
        "cpu_s_other_processes": round(busy - child.ru_utime - child.ru_stime, 1),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    if status == 0:
        from ovchat.convert import read_manifest

        result["output_bytes"] = sum(f.stat().st_size for f in args.output.iterdir() if f.is_file())
        result["bitwidth_distribution"] = read_manifest(args.output)["bitwidth_distribution"]
    print(json.dumps(result, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
