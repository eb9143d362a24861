#!/usr/bin/env python3
"""`ovchat serve` measured as an appliance lives with it: conversations, memory, a busy box.

    python scripts/bench_server.py conversation -m smollm2-135m      # TTFT of turns 1..8
    python scripts/bench_server.py memory -m smollm2-135m --requests 500
    python scripts/bench_server.py contention -m smollm2-135m --hogs 2

- ``conversation``: an 8-turn conversation (a 300-token system prompt, one question a turn,
  greedy replies of up to 64 tokens), the time to each reply's first token: ``ChatSession`` in
  this process, then through a server with the prefix cache (the default), then through one
  with ``--no-prefix-cache``. The server's times are the client's: from sending the request to
  the first streamed token, HTTP included.
- ``memory``: the engine process's resident memory at start and after every 100 of N mixed
  requests (prompts of 30 to 1,500 tokens, replies of 16 to 128, 4 clients), for the old
  defaults (a fixed 2 GB KV pool, no prefix cache) and the new ones (a cache that grows, prefix
  cache on).
- ``contention``: ``--hogs`` busy processes (one per core by default) run all along; the model's
  load time (start to /health 200), then /health's p99 every 50 ms while two clients generate,
  with the engine at the same priority and with ``--nice 10``.

Each server is a fresh ``ovchat serve`` on a free loopback port; one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from typing import List, Optional, Tuple

SYSTEM = ("You are the assistant of a small hotel in the mountains. You answer guests' questions about the hotel, "
          "the village and the walks around it, briefly and kindly. ") * 6
QUESTIONS = ["When is breakfast served?", "Is there a walk to the lake?", "How long does it take?",
             "Can I borrow walking poles?", "Where can I buy bread in the village?", "Is the bakery open on Sunday?",
             "What is the weather usually like in June?", "Can you book me a table for dinner?"]


def start(model: str, *args: str) -> Tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ovchat.cli", "serve", "-m", model, "--port", "0",
                             "--device", "CPU", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = None
    for line in proc.stderr:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found:
            url = found.group(1)
            break
    if url is None:
        sys.exit("bench_server: the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, url


def get(url: str, path: str) -> Tuple[int, dict]:
    host, port = url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=600)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else {}
    finally:
        conn.close()


def wait_ready(url: str, timeout: float = 600) -> float:
    start_at = time.perf_counter()
    while time.perf_counter() - start_at < timeout:
        try:
            if get(url, "/health")[0] == 200:
                return time.perf_counter() - start_at
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("bench_server: the server never became ready")


def chat(url: str, model: str, messages: List[dict], max_tokens: int, stream: bool = True) -> Tuple[float, str, int]:
    """(seconds to the first streamed token, the reply, its prompt tokens)."""
    host, port = url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=600)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"bench_server: the server answered {response.status}: {response.read()[:300]!r}")
    first, text, prompt = None, "", 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter() - sent
                text += piece
        prompt = (event.get("usage") or {}).get("prompt_tokens", prompt)
    conn.close()
    return first or 0.0, text, prompt


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def name_of(model: str) -> str:
    from ovchat.server import model_id
    from ovchat.store import resolve_model

    return model_id(resolve_model(model))


# -- conversation ---------------------------------------------------------------------------------

def conversation(args) -> None:
    from ovchat.session import ChatSession

    session = ChatSession(args.model, device="CPU", system=SYSTEM)
    local = []
    for question in QUESTIONS:
        session.send(question, max_new_tokens=64)
        local.append(session.last_metrics.ttft_s)
    print(json.dumps({"way": "ChatSession", "ttft_s": [round(t, 3) for t in local],
                      "prompt_tokens_last": session.last_metrics.prompt_tokens}), flush=True)
    del session
    for way, extra in (("serve", ()), ("serve --no-prefix-cache", ("--no-prefix-cache",))):
        proc, url = start(args.model, *extra)
        try:
            wait_ready(url)
            name = name_of(args.model)
            chat(url, name, [{"role": "user", "content": "Hi"}], 4)  # the first request's one-time costs
            messages, times, prompt = [{"role": "system", "content": SYSTEM}], [], 0
            for question in QUESTIONS:
                messages.append({"role": "user", "content": question})
                first, reply, prompt = chat(url, name, messages, 64)
                messages.append({"role": "assistant", "content": reply})
                times.append(first)
            print(json.dumps({"way": way, "ttft_s": [round(t, 3) for t in times], "prompt_tokens_last": prompt}),
                  flush=True)
        finally:
            stop(proc)


# -- memory ---------------------------------------------------------------------------------------

def engine_rss(url: str) -> int:
    from ovchat.machine import resident_bytes

    return resident_bytes(get(url, "/health")[1]["engine"]["pid"])


def memory(args) -> None:
    words = "the of and to in is was for on that with as by at from his her an be it this are".split()
    ways = (("fixed 2 GB pool, no prefix cache", ("--kv-cache-gb", "2", "--no-prefix-cache")),
            ("defaults (the cache grows, prefix cache on)", ()))
    for way, extra in ways[1:] if args.defaults_only else ways:
        proc, url = start(args.model, "--max-concurrency", "4", *extra)
        try:
            wait_ready(url)
            name = name_of(args.model)
            rows = {"way": way, "start_mb": engine_rss(url) >> 20, "after_mb": []}
            rng = random.Random(7)
            jobs = [(" ".join(rng.choice(words) for _ in range(rng.choice([30, 200, 600, 1500]))),
                     rng.choice([16, 64, 128])) for _ in range(args.requests)]

            def one(job) -> None:
                chat(url, name, [{"role": "user", "content": "Summarise: " + job[0]}], job[1], stream=False)

            peak = 0
            with ThreadPoolExecutor(4) as pool:
                for start_at in range(0, len(jobs), 100):
                    list(pool.map(one, jobs[start_at:start_at + 100]))
                    rss = engine_rss(url)
                    peak = max(peak, rss)
                    rows["after_mb"].append(rss >> 20)
            rows["peak_seen_mb"] = peak >> 20
            print(json.dumps(rows), flush=True)
        finally:
            stop(proc)


# -- contention -----------------------------------------------------------------------------------

def contention(args) -> None:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        for way, extra in (("same priority (default)", ()), ("--nice 10", ("--nice", "10"))):
            started = time.perf_counter()
            proc, url = start(args.model, *extra)
            try:
                wait_ready(url)
                load_s = time.perf_counter() - started
                name = name_of(args.model)
                done = threading.Event()
                latencies: List[float] = []

                def probe() -> None:
                    while not done.is_set():
                        t = time.perf_counter()
                        get(url, "/health")
                        latencies.append(time.perf_counter() - t)
                        time.sleep(0.05)

                prober = threading.Thread(target=probe)
                prober.start()
                tokens_at = time.perf_counter()
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda q: chat(url, name, [{"role": "user", "content": q}], 64), QUESTIONS[:4]))
                generate_s = time.perf_counter() - tokens_at
                done.set()
                prober.join()
                latencies.sort()
                print(json.dumps({"way": way, "hogs": args.hogs, "start_to_ready_s": round(load_s, 2),
                                  "four_replies_s": round(generate_s, 2),
                                  "health_p50_ms": round(statistics.median(latencies) * 1000, 1),
                                  "health_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
                                  "health_max_ms": round(latencies[-1] * 1000, 1), "probes": len(latencies)}),
                      flush=True)
            finally:
                stop(proc)
    finally:
        for hog in hogs:
            hog.kill()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["conversation", "memory", "contention"])
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=500, help="memory: requests sent")
    parser.add_argument("--defaults-only", action="store_true", help="memory: only the new defaults")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="contention: busy processes")
    args = parser.parse_args(argv)
    {"conversation": conversation, "memory": memory, "contention": contention}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
