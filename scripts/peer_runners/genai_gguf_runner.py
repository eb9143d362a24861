"""Peer runner: OpenVINO GenAI loading the .gguf file directly (LLMPipeline builds the model and
the tokenizer from the GGUF at every load). Runs in the genai venv of scripts/bench_peers.py; see
peer_common.py for the protocol."""

import sys

from peer_common import main

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import openvino_genai  # noqa: E402


class _Ticker(openvino_genai.StreamerBase):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def write(self, token):
        self.clock.tick(len(token) if isinstance(token, list) else 1)
        return openvino_genai.StreamingStatus.RUNNING

    def end(self):
        pass


def load(request):
    # GenAI's defaults for the CPU, as a user of LLMPipeline gets them.
    return openvino_genai.LLMPipeline(request["model"], "CPU")


def generate(pipe, ids, n, clock):
    config = pipe.get_generation_config()
    config.max_new_tokens = config.min_new_tokens = n
    config.ignore_eos, config.do_sample = True, False
    clock.start()
    result = pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), config, _Ticker(clock))
    return [int(t) for t in result.tokens[0]]


def versions():
    from importlib.metadata import version

    return {name: version(name) for name in ("openvino-genai", "openvino", "openvino-tokenizers")}


def detokenize(pipe, tokens):
    return pipe.get_tokenizer().decode(tokens)


if __name__ == "__main__":
    sys.exit(main(load, generate, versions, detokenize))
