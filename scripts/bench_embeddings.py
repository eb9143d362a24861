#!/usr/bin/env python3
"""Sentence embeddings: ovchat against sentence-transformers (torch) and llama.cpp, in one run.

    python scripts/bench_embeddings.py                       # all-mpnet-base-v2 from the store
    python scripts/bench_embeddings.py --peers ovchat,llama-server --sentences 128

Two comparisons, each peer in fresh processes, batch sizes 1 and 32 (``--batches``), the same
texts (a fixed multilingual set of short and long sentences, ``--sentences`` of them):

- **the real model** (all-mpnet-base-v2): ovchat's ``Embedder`` on its conversion (fp16 weights,
  f32 compute) against ``SentenceTransformer.encode`` on the same safetensors, in a venv of its own
  (torch 2.13.0 CPU, sentence-transformers, transformers; created once under ~/.cache/ovchat-bench).
  llama.cpp has no MPNet, so it is not in this one.
- **a BERT-base-shaped encoder** (12 layers, 768 wide, random weights from
  scripts/make_encoder.py, written as an F16 GGUF the way llama.cpp's converter does):
  ovchat's ``Embedder`` on its conversion of that GGUF against llama.cpp's ``llama-server
  --embedding`` on the same file (a request of BATCH texts to /v1/embeddings at a time; built as
  scripts/load_test.py builds it). llama-server's figure includes its HTTP round trips.

Reported: sentences/s (after a warm-up batch), load time and peak RSS (VmHWM: all the process
ever held resident). Every figure comes from the one run; compare ratios, not machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_peers import ensure_venv, VENVS  # noqa: E402
from load_test import build_llama_server  # noqa: E402

log = logging.getLogger("bench_embeddings")
RUNNER = SCRIPTS / "peer_runners" / "embed_runner.py"
VENVS["sentence-transformers"] = [["torch==2.13.0"],
                                  ["torch==2.13.0", "sentence-transformers==6.3.0", "transformers==5.5.4"]]
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}

BASE = [
    "The thermostat in the living room is set to 21 degrees.",
    "Turn off the porch light at midnight.",
    "La lavadora termina su ciclo en cuarenta minutos.",
    "Der Kühlschrank meldet, dass die Tür seit zehn Minuten offen steht.",
    "Le four préchauffe à 180 degrés pour la tarte aux pommes.",
    "How do I reset the router to its factory settings?",
    "The manual says to descale the coffee machine every three months, using a solution of citric "
    "acid, and to run two cycles of clean water afterwards before brewing again.",
    "Il riscaldamento si accende alle sei del mattino nei giorni feriali.",
    "Warranty claims need the receipt and the serial number printed under the battery cover.",
    "Our solar panels produced 14 kWh yesterday, most of it between eleven and three.",
    "The smoke detector chirps once a minute when its battery is low; replace it with a 9 V cell.",
    "Wie lange hält der Akku des Staubsaugers bei voller Leistung?",
    "Water the tomatoes every other evening unless it rained.",
    "El código del garaje cambia el primer día de cada mes.",
    "The dishwasher's filter should be rinsed weekly and the spray arms checked for blockages "
    "whenever the glasses come out cloudy or with residue on them.",
    "Notes from the meeting: move the backup to Sunday night and keep thirty days of snapshots.",
]


def texts(count: int) -> List[str]:
    """``count`` distinct texts: the base sentences, then pairs of them (longer inputs)."""
    out = []
    i = 0
    while len(out) < count:
        a, b = BASE[i % len(BASE)], BASE[(i * 7 + 3) % len(BASE)]
        out.append(a if i < len(BASE) else f"{a} {b}")
        i += 1
    return out


def run_peer(python: Path, peer: str, model: Path, texts_file: Path, batch: int, env=None) -> dict:
    done = subprocess.run([str(python), str(RUNNER), peer, str(model), str(texts_file), str(batch)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                          env=env)
    if done.returncode:
        raise RuntimeError(f"{peer} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_llama_server(gguf: Path, sentences: List[str], batch: int) -> dict:
    import socket

    binary = build_llama_server()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--embedding",
                             "--pooling", "mean", "-c", "8192", "-b", "8192", "-ub", "8192",
                             "-t", str(os.cpu_count() or 2), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("llama-server exited at start")
                time.sleep(0.1)
        load_s = time.perf_counter() - started

        def embed(chunk):
            body = json.dumps({"input": chunk, "model": "x"}).encode()
            request = urllib.request.Request(url + "/v1/embeddings", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as r:
                return [d["embedding"] for d in json.load(r)["data"]]

        embed(sentences[:batch])
        started = time.perf_counter()
        vectors = []
        for i in range(0, len(sentences), batch):
            vectors.extend(embed(sentences[i:i + batch]))
        elapsed = time.perf_counter() - started
        return {"load_s": load_s, "seconds": elapsed, "sentences_per_s": len(sentences) / elapsed,
                "peak_rss_bytes": vm_hwm(proc.pid), "dimensions": len(vectors[0]), "first": vectors[0][:8]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bert_base_gguf(work: Path) -> Path:
    """A BERT-base-shaped random encoder as an F16 GGUF (and ovchat's conversion of it), once."""
    from make_encoder import write_encoder, write_encoder_gguf

    gguf = work / "bert-base-random.f16.gguf"
    if not gguf.is_file():
        hf = write_encoder(work / "bert-base-random", "bert", dtype="f16", **BERT_BASE)
        write_encoder_gguf(gguf, hf, qtype="F16")
    return gguf


def convert_once(source: Path, out: Path) -> Path:
    if not (out / "ovchat.json").is_file():
        from ovchat.convert import convert
        from ovchat.convert.recipe import Recipe

        convert(source, out, recipe=Recipe(weight_format="fp16"))
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(title: str, rows: Dict[str, Dict[int, dict]], batches: List[int]) -> str:
    lines = [f"\n{title}", "| peer | batch | sentences/s | load | peak RSS |", "| --- | --- | --- | --- | --- |"]
    for peer, by_batch in rows.items():
        for batch in batches:
            r = by_batch.get(batch)
            if r:
                lines.append(f"| {peer} | {batch} | {r['sentences_per_s']:.1f} | {r['load_s']:.2f} s | "
                             f"{r['peak_rss_bytes'] / 1e6:.0f} MB |")
    peers = list(rows)
    if len(peers) > 1:
        for other in peers[1:]:
            for batch in batches:
                a, b = rows[peers[0]].get(batch), rows[other].get(batch)
                if a and b:
                    lines.append(f"| {peers[0]} ÷ {other} | {batch} | {a['sentences_per_s'] / b['sentences_per_s']:.2f}"
                                 f" | | {a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="all-mpnet-base-v2", help="ovchat's embedding model (store name or dir)")
    parser.add_argument("--peers", default="ovchat,sentence-transformers,llama-server")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "ovchat-bench")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peers = args.peers.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    from ovchat.modelfiles import read_manifest
    from ovchat.store import resolve_model

    model = resolve_model(args.model)
    source = Path(read_manifest(model)["source"]["path"])
    work = args.work / "embeddings"
    work.mkdir(parents=True, exist_ok=True)
    texts_file = work / f"texts-{args.sentences}.json"
    sentences = texts(args.sentences)
    texts_file.write_text(json.dumps(sentences, ensure_ascii=False))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "sentences": args.sentences,
              "real": {}, "bert_base": {}}

    real: Dict[str, Dict[int, dict]] = {}
    if "ovchat" in peers:
        real["ovchat"] = {b: run_peer(Path(sys.executable), "ovchat", model, texts_file, b) for b in batches}
    if "sentence-transformers" in peers:
        st = ensure_venv(args.work, "sentence-transformers")
        real["sentence-transformers"] = {b: run_peer(st, "sentence-transformers", source, texts_file, b)
                                         for b in batches}
    report["real"] = real
    print(f"{report['machine']}, {report['date']}, {args.sentences} texts")
    print(table(f"{model.name} (fp16 IR / safetensors)", real, batches))

    if "llama-server" in peers:
        gguf = bert_base_gguf(work)
        converted = convert_once(gguf, work / "bert-base-random-ov")
        bert = {"ovchat": {b: run_peer(Path(sys.executable), "ovchat", converted, texts_file, b) for b in batches},
                "llama-server": {b: run_llama_server(gguf, sentences, b) for b in batches}}
        report["bert_base"] = bert
        print(table("BERT-base shape, random F16 GGUF", bert, batches))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
