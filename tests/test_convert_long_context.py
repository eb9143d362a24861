"""Converted models stay exact far into the context, for every family, against the numpy reference.

A precision error in anything a position multiplies grows with the distance between query and
key: RoPE's inverse frequencies stored in f16 (0.649381... becomes 0.6494140625) put the logits
1.5-2.8e-2 off at 2,048 tokens, where f32 round-off alone stays near 1e-5. So each family is
converted by `convert()` as a user would (the saved IR, not the in-memory graph), run for 2,100
positions in two calls (the second past the sliding window and past LongRoPE's switch from short
to long factors, which transformers makes per call), and compared with tests/convert_helpers'
float64 reference on the same weights:

- fp16 from an f16 checkpoint: the stored weights are the checkpoint's exactly;
- the int4 recipe: against the reference run on the IR's own dequantized weights, so only
  what the graph computes is measured, not what quantization costs.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert_helpers import Reference, write_checkpoint

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ovchat.convert import convert  # noqa: E402
from ovchat.convert.recipe import Recipe  # noqa: E402

# f32 everywhere: activations, the KV cache, and no 8-bit activation quantization.
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
FIRST, TOTAL = 1000, 2100  # two calls: positions 0-999, then 1000-2099
WINDOW = 512
BOUND = 1e-4  # relative to the largest logit; f32 round-off is about 1e-5 here
LONG = {"max_position_embeddings": 4096}
CASES = {
    "llama3.2": dict(arch="llama", tie_word_embeddings=True, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-window": dict(arch="mistral", sliding_window=WINDOW),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "phi3-window": dict(arch="phi3", sliding_window=WINDOW, original_max_position_embeddings=4096),
    # Phi-4-mini's form: partial rotary, LongRoPE switching at 1024 positions, tied embeddings.
    "phi4-mini-longrope": dict(arch="phi3", num_key_value_heads=2, tie_word_embeddings=True,
                               partial_rotary_factor=0.75, sliding_window=None,
                               original_max_position_embeddings=1024,
                               rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                             "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
    "gemma3-window": dict(arch="gemma3", sliding_window=WINDOW),
    # SmolLM3 with the window on: only the NoPE layer (the fourth) slides, as transformers has it.
    "smollm3-window": dict(arch="smollm3", use_sliding_window=True, sliding_window=WINDOW),
}
INT4_CASES = ["llama3.2", "qwen3", "phi4-mini-longrope", "gemma3-window"]


def _ids():
    return [int(t) for t in np.random.default_rng(5).integers(3, 300, size=TOTAL)]


def _run_ir(xml, ids):
    request = ov.Core().compile_model(str(xml), "CPU", EXACT).create_infer_request()
    out = []
    for start, end in ((0, FIRST), (FIRST, TOTAL)):
        out.append(request.infer({"input_ids": np.array([ids[start:end]], np.int64),
                                  "attention_mask": np.ones((1, end), np.int64),
                                  "position_ids": np.arange(start, end, dtype=np.int64)[None],
                                  "beam_idx": np.zeros(1, np.int32)})["logits"][0].copy())
    return out


def _run_reference(reference, ids):
    reference.reset()
    return [reference.forward(ids[:FIRST]), reference.forward(ids[FIRST:])]


def _relative_errors(got, want):
    return [float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want)]


def dequantized_weights(xml) -> dict:
    """Every MatMul and Gather weight of an IR as the plugin sees it (the compressed integers
    times their scales, in f32), by Hugging Face name: the op's name plus ".weight"."""
    import openvino.opset13 as ops

    model = ov.Core().read_model(str(xml))
    sources, names = [], []
    for op in model.get_ordered_ops():
        port = {"MatMul": 1, "Gather": 0}.get(op.get_type_name())
        if port is None:
            continue
        source = op.input_value(port)
        chain = source.get_node()
        while chain.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape"):
            chain = chain.input_value(0).get_node()
        if chain.get_type_name() != "Constant" or len(chain.get_output_shape(0)) < 2:
            continue  # activations, or the index tables of the mask
        name = "model.embed_tokens" if op.get_type_name() == "Gather" else op.get_friendly_name()
        sources.append(source)
        names.append(f"{name}.weight")
    folded = ov.Model([ops.result(s) for s in sources], [], "weights")
    values = ov.Core().compile_model(folded, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request().infer({})
    return {name: np.array(values[i]) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    made = {}

    def get(case: str, weight_format: str):
        if case not in made:
            spec = {**LONG, **CASES[case]}
            made[case] = write_checkpoint(root / case, spec.pop("arch"), dtype="f16", seed=3, **spec)
        out = root / f"{case}-{weight_format}"
        if not out.exists():
            convert(made[case], out, recipe=Recipe(weight_format=weight_format), receipt=False)
        return made[case], out
    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fp16_conversion_is_exact_at_2100_positions(case, converted):
    checkpoint, out = converted(case, "fp16")
    ids = _ids()
    errors = _relative_errors(_run_ir(out / "openvino_model.xml", ids), _run_reference(Reference(checkpoint), ids))
    assert max(errors) <= BOUND, f"relative error by call {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("case", INT4_CASES)
def test_int4_conversion_is_exact_to_its_own_weights_at_2100_positions(case, converted):
    checkpoint, out = converted(case, "int4")
    reference = Reference(checkpoint)
    weights = dequantized_weights(out / "openvino_model.xml")
    quantized = [n for n in weights if n in reference.w and not np.array_equal(weights[n], reference.w[n])]
    assert quantized, "the int4 recipe left every weight as it was"
    tied = reference.config.get("tie_word_embeddings")
    reference.w.update({n: w for n, w in weights.items() if not (tied and n == "lm_head.weight")})
    for name in [n for n in reference.w if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
        del reference.w[name]  # Phi-3's fused projections: the IR's split ones replace them
    ids = _ids()
    errors = _relative_errors(_run_ir(out / "openvino_model.xml", ids), _run_reference(reference, ids))
    assert max(errors) <= BOUND, f"relative error by call {errors}"
