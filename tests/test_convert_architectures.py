"""The newer architectures from GGUF files, as llama.cpp writes them, against the numpy reference.

tests/test_convert_graph.py proves each builder on Hugging Face checkpoints. Here the same tiny
random weights go through a GGUF written with llama.cpp's conventions (tests/convert_helpers:
names, Q/K permutation for the llama family, Gemma's +1 norms, rope tables as tensors, the layer
patterns llama.cpp keeps in code), so what ovchat's GGUF reader undoes is checked too:

- an F32 GGUF gives the Hugging Face checkpoint's logits exactly (prefill and decode steps);
- a quantized GGUF, kept in its own blocks, gives the logits of its dequantized weights;
- converted with default options, LLMPipeline's greedy tokens equal the reference's, past the
  sliding window where there is one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from convert_helpers import (F32_CPU, Reference, gguf_from_hf, hf_tensors_from_gguf, open_tiny,
                             write_checkpoint)

ov = pytest.importorskip("openvino")

from ovchat.convert.sources import open_checkpoint  # noqa: E402
from ovchat.convert.models import build_model  # noqa: E402

WINDOW = 6
EXACT = {**F32_CPU, "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# Llama 3.2's own rope scaling (llama.cpp stores it as a rope_freqs table ovchat must recognise).
LLAMA32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
CASES = {
    "llama3.2-tied": dict(arch="llama", tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA32),
    "qwen3": dict(arch="qwen3"),
    "gemma3-window": dict(arch="gemma3", sliding_window=WINDOW),
    "phi4-mini-like": dict(arch="phi3", num_key_value_heads=2, tie_word_embeddings=True, partial_rotary_factor=0.75,
                           rope_scaling=LONGROPE, max_position_embeddings=64, original_max_position_embeddings=16,
                           sliding_window=None),
    "smollm3": dict(arch="smollm3"),
}
PREFILL, TOTAL = 10, 20  # past the window (6) and past LongRoPE's switch (16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    made = {}

    def get(case: str):
        if case not in made:
            spec = dict(CASES[case])
            made[case] = write_checkpoint(root / case, spec.pop("arch"), seed=11, **spec)
        return made[case]
    return get


def _tensors(path):
    checkpoint = open_tiny(path)
    return {n: checkpoint.get(n).to_float32() for n in checkpoint.names()}


def _ids(n: int):
    return [int(t) for t in np.random.default_rng(9).integers(3, 300, size=n)]


def _logits_by_step(model, ids):
    request = ov.Core().compile_model(model, "CPU", EXACT).create_infer_request()
    out, past = [], 0
    for chunk in [ids[:PREFILL]] + [[t] for t in ids[PREFILL:]]:
        n = len(chunk)
        out.append(request.infer({"input_ids": np.array([chunk], np.int64),
                                  "attention_mask": np.ones((1, past + n), np.int64),
                                  "position_ids": np.arange(past, past + n, dtype=np.int64)[None],
                                  "beam_idx": np.zeros(1, np.int32)})["logits"][0])
        past += n
    return np.concatenate(out)


def _reference_by_step(reference, ids):
    reference.reset()
    return np.concatenate([reference.forward(ids[:PREFILL])] + [reference.forward([t]) for t in ids[PREFILL:]])


@pytest.mark.parametrize("case", list(CASES))
def test_f32_gguf_gives_the_hugging_face_logits(case, checkpoints, tmp_path):
    path = checkpoints(case)
    config = json.loads((path / "config.json").read_text())
    gguf_path = gguf_from_hf(tmp_path / "m.gguf", config, _tensors(path), "F32", tokenizer_json=path / "tokenizer.json")
    checkpoint = open_checkpoint(gguf_path)
    ids = _ids(TOTAL)
    got = _logits_by_step(build_model(checkpoint), ids)
    np.testing.assert_allclose(got, _reference_by_step(Reference(path), ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_gguf_kept_gives_the_logits_of_its_dequantized_weights(case, checkpoints, tmp_path):
    path = checkpoints(case)
    config = json.loads((path / "config.json").read_text())
    # Q4_1 (an offset per block) for the projections, Q8_0 for the embedding, as in the demo GGUF.
    tensors = _tensors(path)
    gguf_path = gguf_from_hf(tmp_path / "m.gguf", config, tensors, "Q4_1",
                             qtypes={"model.embed_tokens.weight": "Q8_0"}, tokenizer_json=path / "tokenizer.json")
    checkpoint = open_checkpoint(gguf_path, keep_quantized=True)
    ids = _ids(TOTAL)
    got = _logits_by_step(build_model(checkpoint), ids)
    assert {form for _, form in checkpoint.forms.values()} >= {"int4_asym g32, f16 scale, f32 zero point"}
    want = _reference_by_step(Reference(config, hf_tensors_from_gguf(gguf_path)), ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # The quantization matters here by far more than the tolerance: these are its own weights.
    assert np.abs(want - _reference_by_step(Reference(path), ids)).max() > 1e-2


_GREEDY = r"""
import json, sys
import numpy as np, openvino as ov, openvino_genai as og
path, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
pipe = og.LLMPipeline(path, "CPU", INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32",
                      DYNAMIC_QUANTIZATION_GROUP_SIZE="0")
cfg = og.GenerationConfig(max_new_tokens=n, do_sample=False, ignore_eos=True)
ids = ov.Tensor(np.array([prompt], np.int64))
res = pipe.generate(og.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), np.int64))), cfg)
print("TOKENS", json.dumps([int(t) for t in res.tokens[0]]))
"""


@pytest.mark.parametrize("case", list(CASES))
def test_converted_gguf_generates_the_reference_tokens(case, checkpoints, tmp_path):
    from ovchat.convert import convert

    path = checkpoints(case)
    config = json.loads((path / "config.json").read_text())
    gguf_path = gguf_from_hf(tmp_path / "m.gguf", config, _tensors(path), "Q8_0", tokenizer_json=path / "tokenizer.json")
    out = convert(gguf_path, tmp_path / "ov", receipt=False)
    assert json.loads((out / "ovchat.json").read_text())["recipe"]["weight_format"] == "keep"
    prompt, n = _ids(PREFILL), TOTAL - PREFILL
    run = subprocess.run([sys.executable, "-c", _GREEDY, str(out), json.dumps(prompt), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("TOKENS ", 1)[1].splitlines()[0])
    assert got == Reference(config, hf_tensors_from_gguf(gguf_path)).greedy(prompt, n)
