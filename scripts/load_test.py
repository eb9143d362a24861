#!/usr/bin/env python3
"""Load test of `ovchat serve` on this machine: throughput and latency at 1, 4 and 8 clients.

Starts its own server on a free loopback port (or uses --url, which must be a loopback
address), then for each concurrency level runs that many clients, each sending chat
completions one after another, until the level has sent its requests or used its time. It
reports requests/s, completion tokens/s, p50 and p99 latency and errors per level, the p99 of
/health while the level runs (a probe every 50 ms: the API must stay responsive under load), and
the ratio of the highest level's token throughput to one client's. Every loop is bounded in
requests and in time, and the script stops by itself (and stops the server it started).

    python scripts/load_test.py                       # the default model, levels 1,4,8
    python scripts/load_test.py -m smollm2-135m --requests-per-client 6 --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from http.client import HTTPConnection, HTTPException
from typing import List, Optional
from urllib.parse import urlparse

PROMPTS = [
    "Write a short story about a dragon who learns to bake bread.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a short story about a robot who wants to become a gardener.",
    "Explain how a steam engine works, step by step.",
    "Write a letter from a cat to its owner about breakfast.",
    "Describe the journey of a river from the mountains to the sea.",
    "Write a short story about a child who finds a map in the attic.",
    "Explain why the sky changes colour at sunset.",
]


@dataclass
class Level:
    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float
    completion_tokens: int
    health_p99_s: float
    health_max_s: float
    error_samples: List[str]


class Http:
    """One keep-alive connection to the server (the standard library's, so the script needs
    nothing beyond ovchat's own install)."""

    def __init__(self, url: str, headers: dict, timeout: float):
        parsed = urlparse(url)
        self.conn = HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
        self.headers = headers

    def request(self, method: str, path: str, body: Optional[dict] = None) -> tuple:
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, HTTPException):
            self.conn.close()  # the next request reconnects
            raise

    def close(self) -> None:
        self.conn.close()


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (with few samples p99 is the slowest request, as it should be)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        sys.exit(f"load_test: cannot resolve {host!r}: {e.strerror}")
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        sys.exit(f"load_test: {url} is not a loopback address; this script only loads a server on this machine")


def start_server(args) -> tuple:
    cmd = [sys.executable, "-m", "ovchat.cli", "serve", "--port", "0", "--device", args.device,
           "--max-concurrency", str(max(args.levels))]
    if args.model:
        cmd += ["-m", args.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: List[str] = []
    url: Optional[str] = None
    deadline = time.monotonic() + args.startup_timeout
    while url is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        log.append(line)
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        sys.exit("load_test: the server did not start:\n" + "".join(log[-20:]))
    # Keep draining the server's log so it can never block on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        http = Http(url, {}, timeout=5)
        try:
            if http.request("GET", "/health")[0] == 200:
                return
        except (OSError, HTTPException):
            pass
        finally:
            http.close()
        time.sleep(0.2)
    sys.exit(f"load_test: {url}/health did not answer 200 within {timeout:.0f}s")


def run_level(url: str, model: str, clients: int, args, headers: dict) -> Level:
    latencies: List[float] = []
    tokens = [0]
    errors: List[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.level_seconds

    def client(index: int) -> None:
        http = Http(url, headers, timeout=args.request_timeout)
        try:
            for n in range(args.requests_per_client):
                if time.monotonic() >= stop_at:
                    return
                body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": PROMPTS[(index + n) % len(PROMPTS)]}]}
                start = time.perf_counter()
                try:
                    status, data = http.request("POST", "/v1/chat/completions", body)
                except (OSError, HTTPException) as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    if status == 200:
                        latencies.append(elapsed)
                        tokens[0] += json.loads(data)["usage"]["completion_tokens"]
                    else:
                        errors.append(f"{status}: {data[:200].decode(errors='replace')}")
        finally:
            http.close()

    health: List[float] = []
    done = threading.Event()

    def probe() -> None:
        http = Http(url, {}, timeout=args.request_timeout)
        try:
            while not done.wait(0.05):
                start = time.perf_counter()
                try:
                    http.request("GET", "/health")
                except (OSError, HTTPException):
                    continue
                health.append(time.perf_counter() - start)
        finally:
            http.close()

    prober = threading.Thread(target=probe, daemon=True)
    start = time.perf_counter()
    prober.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    done.set()
    prober.join()
    seconds = time.perf_counter() - start
    return Level(clients=clients, requests=len(latencies), errors=len(errors), seconds=round(seconds, 2),
                 requests_per_s=round(len(latencies) / seconds, 3), tokens_per_s=round(tokens[0] / seconds, 1),
                 p50_s=round(percentile(latencies, 50), 3), p99_s=round(percentile(latencies, 99), 3),
                 completion_tokens=tokens[0], health_p99_s=round(percentile(health, 99), 4),
                 health_max_s=round(max(health, default=float("nan")), 4), error_samples=errors[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("-m", "--model", help="model for the server this script starts (default: the default)")
    parser.add_argument("--device", default="auto", help="device for the server this script starts")
    parser.add_argument("--api-key", default=os.environ.get("OVCHAT_API_KEY"), help="for --url servers with a key")
    parser.add_argument("--levels", default="1,4,8", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64, help="reply length asked of every request")
    parser.add_argument("--level-seconds", type=float, default=90, help="no new requests after this per level")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    try:
        args.levels = sorted({int(x) for x in args.levels.split(",")})
    except ValueError:
        parser.error("--levels must be whole numbers separated by commas, e.g. 1,4,8")
    if not args.levels or args.levels[0] < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("levels, --requests-per-client and --max-tokens must be at least 1")

    proc = None
    if args.url:
        check_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        wait_ready(url, args.startup_timeout)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        http = Http(url, headers, timeout=args.request_timeout)
        status, data = http.request("GET", "/v1/models")
        if status != 200:
            sys.exit(f"load_test: GET /v1/models answered {status}: {data[:200].decode(errors='replace')}")
        model = json.loads(data)["data"][0]["id"]
        # Warm-up: the first request pays for one-time set-up that no level should be charged for.
        http.request("POST", "/v1/chat/completions",
                     {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
        http.close()
        levels = [run_level(url, model, c, args, headers) for c in args.levels]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    base, top = levels[0], levels[-1]
    ratio = round(top.tokens_per_s / base.tokens_per_s, 2) if base.tokens_per_s else None
    if args.json:
        print(json.dumps({"url": url, "model": model, "max_tokens": args.max_tokens,
                          "levels": [asdict(l) for l in levels],
                          f"throughput_ratio_{top.clients}_to_{base.clients}": ratio}, indent=2))
    else:
        print(f"model {model} at {url}, {args.max_tokens} tokens asked per reply")
        print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
              f"{'/health p99 ms':>14}")
        for l in levels:
            print(f"{l.clients:>7} {l.requests:>8} {l.errors:>6} {l.requests_per_s:>7.2f} {l.tokens_per_s:>7.1f} "
                  f"{l.p50_s:>7.2f} {l.p99_s:>7.2f} {1000 * l.health_p99_s:>14.1f}")
        print(f"token throughput, {top.clients} clients / {base.clients}: {ratio}x")
        for l in levels:
            for sample in l.error_samples:
                print(f"  error at {l.clients} clients: {sample}")
    return 1 if any(l.errors for l in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
