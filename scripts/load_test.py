#!/usr/bin/env python3
"""Load test of `ovchat serve` on this machine: throughput and latency at 1, 4 and 8 clients.

Starts its own server on a free loopback port (or uses --url, which must be a loopback
address), then for each concurrency level runs that many clients, each sending chat
completions one after another, until the level has sent its requests or used its time. It
reports requests/s, completion tokens/s, p50 and p99 latency and errors per level, the p99 of
/health while the level runs (a probe every 50 ms: the API must stay responsive under load), and
the ratio of the highest level's token throughput to one client's. Every loop is bounded in
requests and in time, and the script stops by itself (and stops the server it started).

With ``--peer llama-server`` the same levels then run against llama.cpp's own server on the
model's GGUF source (or ``--gguf``), with ``-np`` slots as many as the top level (continuous
batching) and all cores. It is built once from the llama.cpp sources vendored in the
llama-cpp-python 0.3.36 sdist (pip download, cmake; minutes on 2 cores) under ~/.cache/ovchat-bench.

    python scripts/load_test.py                       # the default model, levels 1,4,8
    python scripts/load_test.py -m smollm2-135m --requests-per-client 6 --max-tokens 64 --json
    python scripts/load_test.py -m smollm2-135m --peer llama-server
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import List, Optional
from urllib.parse import urlparse

LLAMA_SDIST = "llama-cpp-python==0.3.36"
BENCH_HOME = Path(os.environ.get("OVCHAT_BENCH_HOME", Path.home() / ".cache" / "ovchat-bench"))
# As scripts/bench_peers.py builds llama.cpp: native, except AMX (its kernels die with SIGILL on
# the AMX VMs here), where the AVX-512 VNNI/BF16 kernels are named instead.
NATIVE = ["-DGGML_NATIVE=ON"]
AMX_FREE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
            "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
            "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"]

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
    from ovchat.store import default_model

    cmd += ["-m", args.model or default_model()]
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


def build_llama_server() -> Path:
    """llama.cpp's llama-server, built once from the sources in the llama-cpp-python sdist."""
    binary = BENCH_HOME / "llama-server" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    work = BENCH_HOME / "llama-server-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(work),
                    LLAMA_SDIST], check=True)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
    with open("/proc/cpuinfo") as f:
        flags = AMX_FREE if " amx_int8" in f.read() else NATIVE
    subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_BLAS=OFF", *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(next((work / "build" / "bin").glob("llama-server")), binary)
    for library in (work / "build" / "bin").glob("*.so*"):
        shutil.copy2(library, binary.parent / library.name)
    shutil.rmtree(work, ignore_errors=True)
    return binary


def start_llama_server(gguf: str, slots: int, context: int) -> tuple:
    """llama-server on a free loopback port with ``slots`` parallel slots, each of ``context`` tokens."""
    binary = build_llama_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                             "-c", str(slots * context), "-t", str(os.cpu_count() or 2), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    return proc, f"http://127.0.0.1:{port}"


def gguf_of(model: Optional[str]) -> str:
    """The GGUF a store model was converted from (its manifest's source)."""
    from ovchat.modelfiles import read_manifest
    from ovchat.store import resolve_model

    path = resolve_model(model)
    source = Path((read_manifest(path).get("source") or {}).get("path", ""))
    if source.suffix != ".gguf" or not source.is_file():
        sys.exit(f"load_test: {path} was not converted from a GGUF on this machine; give --gguf")
    return str(source)


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
    parser.add_argument("--peer", choices=["llama-server"], help="then run the same levels against this peer")
    parser.add_argument("--gguf", help="the GGUF for the peer (default: the model's GGUF source)")
    parser.add_argument("--peer-context", type=int, default=2048, help="context tokens per llama-server slot")
    args = parser.parse_args()
    try:
        args.levels = sorted({int(x) for x in args.levels.split(",")})
    except ValueError:
        parser.error("--levels must be whole numbers separated by commas, e.g. 1,4,8")
    if not args.levels or args.levels[0] < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("levels, --requests-per-client and --max-tokens must be at least 1")

    runs = [("ovchat", *measure_ovchat(args))]
    if args.peer:
        proc, url = start_llama_server(args.gguf or gguf_of(args.model), max(args.levels), args.peer_context)
        try:
            wait_ready(url, args.startup_timeout)
            runs.append(("llama-server", url, "model", measure(url, "model", args, {})))
        finally:
            stop(proc)
    if args.json:
        print(json.dumps({"max_tokens": args.max_tokens, "runs": [
            {"server": name, "url": url, "model": model, "levels": [asdict(level) for level in levels],
             "throughput_ratio": ratio(levels)} for name, url, model, levels in runs]}, indent=2))
    else:
        for name, url, model, levels in runs:
            print(f"{name}: model {model} at {url}, {args.max_tokens} tokens asked per reply")
            print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
                  f"{'/health p99 ms':>14}")
            for l in levels:
                print(f"{l.clients:>7} {l.requests:>8} {l.errors:>6} {l.requests_per_s:>7.2f} {l.tokens_per_s:>7.1f} "
                      f"{l.p50_s:>7.2f} {l.p99_s:>7.2f} {1000 * l.health_p99_s:>14.1f}")
            print(f"token throughput, {levels[-1].clients} clients / {levels[0].clients}: {ratio(levels)}x")
            for l in levels:
                for sample in l.error_samples:
                    print(f"  error at {l.clients} clients: {sample}")
    return 1 if any(l.errors for _, _, _, levels in runs for l in levels) else 0


def ratio(levels: List[Level]) -> Optional[float]:
    return round(levels[-1].tokens_per_s / levels[0].tokens_per_s, 2) if levels[0].tokens_per_s else None


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure_ovchat(args) -> tuple:
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
        status, data = http.request("GET", "/health")
        model = json.loads(data).get("model") if status == 200 else None
        if model is None:
            sys.exit("load_test: the server names no model in /health; start it with -m (or give -m here)")
        return url, model, measure(url, model, args, headers)
    finally:
        if proc is not None:
            stop(proc)


def measure(url: str, model: str, args, headers: dict) -> List[Level]:
    http = Http(url, headers, timeout=args.request_timeout)
    # Warm-up: the first request pays for one-time set-up that no level should be charged for.
    http.request("POST", "/v1/chat/completions",
                 {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    http.close()
    return [run_level(url, model, c, args, headers) for c in args.levels]

if __name__ == "__main__":
    sys.exit(main())
