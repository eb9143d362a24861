"""Peer runner: llama.cpp through llama-cpp-python, on the .gguf file. Runs in the llama-cpp venv
of scripts/bench_peers.py; see peer_common.py for the protocol."""

import sys

from peer_common import main

from llama_cpp import Llama  # noqa: E402


def load(request):
    # llama-cpp-python's defaults but two: the context must hold the prompt and the reply (its
    # default is 512 tokens), and every core computes (its default is half of them; OpenVINO's
    # latency hint and torch use all physical cores). verbose: llama.cpp's log goes to stderr,
    # which bench_peers shows only when a run fails ("Failed to load model" alone says nothing).
    n_ctx = max(512, len(request["prompt_ids"]) + request["new_tokens"] + 16)
    return Llama(model_path=request["model"], n_ctx=n_ctx, n_threads=request["threads"],
                 n_threads_batch=request["threads"], verbose=True)


def generate(llm, ids, n, clock):
    llm.reset()  # no reuse of a previous prompt's KV cache: every generation reads its whole prompt
    tokens = []
    clock.start()
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        clock.tick()
        tokens.append(token)
        if len(tokens) == n:  # generate() never stops by itself: exactly n tokens, eos or not
            break
    return tokens


def versions():
    from importlib.metadata import version

    return {"llama-cpp-python": version("llama-cpp-python")}


def detokenize(llm, tokens):
    return llm.detokenize(tokens).decode("utf-8", "replace")


if __name__ == "__main__":
    sys.exit(main(load, generate, versions, detokenize))
