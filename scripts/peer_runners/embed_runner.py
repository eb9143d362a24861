"""Peer runner for scripts/bench_embeddings.py: load one sentence encoder, embed the texts of a
JSON file in batches, print one JSON line. Runs in the peer's own interpreter:

    python embed_runner.py ovchat|sentence-transformers MODEL TEXTS.json BATCH

It imports only that peer's library, so the sentence-transformers venv needs no ovchat and
ovchat's never sees torch. Peak RSS is the process's VmHWM (everything it ever held resident).
"""

import json
import sys
import time


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    peer, model, texts_file, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(texts_file, encoding="utf-8") as f:
        texts = json.load(f)
    started = time.perf_counter()
    if peer == "ovchat":
        from ovchat.embeddings import Embedder

        embedder = Embedder(model, device="CPU", batch_size=batch)

        def encode(chunk):
            return embedder.encode(chunk)
    elif peer == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(model, device="cpu")

        def encode(chunk):
            return encoder.encode(chunk, batch_size=batch, convert_to_numpy=True)
    else:
        raise SystemExit(f"unknown peer {peer}")
    load_s = time.perf_counter() - started
    encode(texts[:batch])  # warm-up: first-inference costs (repacking, allocator) are not counted
    started = time.perf_counter()
    vectors = []
    for i in range(0, len(texts), batch):
        vectors.extend(encode(texts[i:i + batch]).tolist())
    elapsed = time.perf_counter() - started
    print(json.dumps({"load_s": load_s, "seconds": elapsed, "sentences_per_s": len(texts) / elapsed,
                      "peak_rss_bytes": peak_rss_bytes(), "dimensions": len(vectors[0]),
                      "first": vectors[0][:8]}))


if __name__ == "__main__":
    main()
