"""Peer runner: the original recipe, optimum.intel.OVModelForCausalLM with a transformers tokenizer
and torch, on a model exported by ``optimum-cli export openvino``. Runs in the optimum venv of
scripts/bench_peers.py; see peer_common.py for the protocol."""

import os
import sys

from peer_common import TokenClock, main

import torch  # noqa: E402  (imported before timing starts, as the other peers' libraries are)
from optimum.intel import OVModelForCausalLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


class _Ticker(BaseStreamer):
    """transformers calls put() with the prompt first, then once per new token."""

    def __init__(self, clock: TokenClock):
        self.clock = clock
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.clock.tick(int(value.numel()))

    def end(self) -> None:
        pass


def load(request):
    # The library's defaults, as a user of the recipe gets them (optimum sets a latency hint);
    # the model is compiled for the CPU at load.
    model = OVModelForCausalLM.from_pretrained(request["model"], device="CPU")
    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    return model, tokenizer


def generate(loaded, ids, n, clock):
    model, tokenizer = loaded
    input_ids = torch.tensor([ids], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock.start()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, streamer=_Ticker(clock))
    return out[0, len(ids):].tolist()


def versions():
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "optimum-intel", "optimum", "transformers", "openvino",
                                             "nncf")}


def detokenize(loaded, tokens):
    return loaded[1].decode(tokens)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OVCHAT_BENCH_THREADS") or torch.get_num_threads()))
    sys.exit(main(load, generate, versions, detokenize))
