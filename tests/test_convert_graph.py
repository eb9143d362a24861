"""The native graph builder against an independent numpy reference, on tiny random checkpoints.

What is proven, per architecture and weight layout (f32/f16/bf16, sharded, tied):
- the stateful float model's logits for a prefill and several decode steps equal the reference's;
- sequences run past a small sliding window, and the window changes the result (so honouring it
  is tested, not assumed);
- LLMPipeline, with paged attention (the default backend) and with the SDPA backend, generates
  exactly the reference's greedy tokens;
- the CPU plugin fuses RMS, RoPE and the stateful SDPA, and the paged-attention pass accepts the
  model, carrying each layer's sliding window over.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convert_helpers import F32_CPU, Reference, open_tiny, save_for_genai, write_checkpoint

ov = pytest.importorskip("openvino")

from ovchat.convert.models import build_model  # noqa: E402
from ovchat.errors import CheckpointError, UnsupportedArchitectureError  # noqa: E402
from ovchat.progress import Progress  # noqa: E402

WINDOW = 6
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES = {
    "llama": dict(arch="llama"),
    "llama-bf16-sharded-tied-llama3": dict(arch="llama", dtype="bf16", shards=2, tie_word_embeddings=True,
                                           rope_scaling=LLAMA3),
    "llama-f16-rope_parameters-linear": dict(arch="llama", dtype="f16", rope_theta=None,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 500000.0}),
    "llama-biases-head_dim": dict(arch="llama", attention_bias=True, mlp_bias=True, head_dim=32),
    "mistral-window": dict(arch="mistral", sliding_window=WINDOW),
    "qwen2-bias-tied": dict(arch="qwen2"),
    "qwen2-bf16-window-upper-layers": dict(arch="qwen2", dtype="bf16", use_sliding_window=True,
                                           sliding_window=WINDOW, max_window_layers=1),
    "phi3-bf16-sharded-window": dict(arch="phi3", dtype="bf16", shards=3, sliding_window=WINDOW),
    "phi3-longrope": dict(arch="phi3", rope_scaling=LONGROPE, max_position_embeddings=64,
                          original_max_position_embeddings=16, sliding_window=None),
    # Phi-4-mini's shape: grouped-query heads, tied embeddings, 3/4 of each head rotating, LongRoPE.
    "phi4-mini-like": dict(arch="phi3", num_key_value_heads=2, tie_word_embeddings=True, partial_rotary_factor=0.75,
                           rope_scaling={**LONGROPE, "short_factor": LONGROPE["short_factor"][:6],
                                         "long_factor": LONGROPE["long_factor"][:6]},
                           max_position_embeddings=64, original_max_position_embeddings=16, sliding_window=None),
    "qwen3": dict(arch="qwen3"),
    "qwen3-bf16-window-upper-layers": dict(arch="qwen3", dtype="bf16", use_sliding_window=True, sliding_window=WINDOW,
                                           max_window_layers=1),
    "gemma3-window": dict(arch="gemma3", sliding_window=WINDOW),
    "gemma3-bf16-scaled-softcap-linear": dict(arch="gemma3", dtype="bf16", sliding_window=WINDOW,
                                              query_pre_attn_scalar=24, final_logit_softcapping=5.0,
                                              rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "smollm3-nope": dict(arch="smollm3"),
}
# LLMPipeline runs (a few seconds each): one case per architecture and RoPE/window variant.
PIPELINE_CASES = ["llama-bf16-sharded-tied-llama3", "mistral-window", "qwen2-bf16-window-upper-layers",
                  "phi3-bf16-sharded-window", "phi3-longrope", "phi4-mini-like", "qwen3-bf16-window-upper-layers",
                  "gemma3-window", "gemma3-bf16-scaled-softcap-linear", "smollm3-nope"]
PREFILL, TOTAL = 10, 20  # 20 > 16 (LongRoPE's switch) and > WINDOW


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def get(case: str) -> Path:
        if case not in made:
            spec = dict(CASES[case])
            made[case] = write_checkpoint(root / case, spec.pop("arch"), seed=len(made), **spec)
        return made[case]
    return get


def _tokens(n: int, seed: int = 7):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 300, size=n)]


def _compile(model):
    return ov.Core().compile_model(model, "CPU", F32_CPU)


def _step(request, chunk, past: int, batch: int = 1):
    n = len(chunk)
    out = request.infer({
        "input_ids": np.tile(np.array([chunk], np.int64), (batch, 1)),
        "attention_mask": np.ones((batch, past + n), np.int64),
        "position_ids": np.tile(np.arange(past, past + n, dtype=np.int64), (batch, 1)),
        "beam_idx": np.arange(batch, dtype=np.int32)})
    return out["logits"]


@pytest.mark.parametrize("case", list(CASES))
def test_stateful_logits_match_reference(case, checkpoints):
    path = checkpoints(case)
    model = build_model(open_tiny(path))
    request = _compile(model).create_infer_request()
    ref = Reference(path)
    ids = _tokens(TOTAL)

    got = _step(request, ids[:PREFILL], 0)[0]
    want = ref.forward(ids[:PREFILL])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4, err_msg=f"{case} prefill")
    for pos in range(PREFILL, TOTAL):
        got = _step(request, ids[pos:pos + 1], pos)[0]
        want = ref.forward(ids[pos:pos + 1])
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4, err_msg=f"{case} decode at {pos}")


@pytest.mark.parametrize("case", ["mistral-window", "phi3-bf16-sharded-window", "phi3-longrope"])
def test_reference_is_sensitive_to_window_and_longrope(case, checkpoints):
    """Guards the test above: without the window (or with short factors only) logits differ."""
    path = checkpoints(case)
    ids = _tokens(TOTAL)
    ref = Reference(path)
    ref.forward(ids[:PREFILL])
    honoured = np.concatenate([ref.forward([t]) for t in ids[PREFILL:]])
    plain = Reference(path)
    if case == "phi3-longrope":
        plain.config = {**plain.config, "rope_scaling": {**LONGROPE, "long_factor": LONGROPE["short_factor"]}}
    else:
        plain.windows = [None] * len(plain.windows)
    plain.forward(ids[:PREFILL])
    ignored = np.concatenate([plain.forward([t]) for t in ids[PREFILL:]])
    assert np.abs(honoured - ignored).max() > 0.05


def test_batch_and_beam_reorder(checkpoints):
    """Two sequences in a batch; beam_idx swaps their caches, as beam search does."""
    path = checkpoints("phi3-bf16-sharded-window")
    model = build_model(open_tiny(path))  # the compiled model uses its weights: keep it alive
    request = _compile(model).create_infer_request()
    a, b = _tokens(12, seed=1), _tokens(12, seed=2)
    ref_a, ref_b = Reference(path), Reference(path)
    out = request.infer({"input_ids": np.array([a[:8], b[:8]], np.int64),
                         "attention_mask": np.ones((2, 8), np.int64),
                         "position_ids": np.tile(np.arange(8, dtype=np.int64), (2, 1)),
                         "beam_idx": np.arange(2, dtype=np.int32)})["logits"]
    np.testing.assert_allclose(out[0], ref_a.forward(a[:8]), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(out[1], ref_b.forward(b[:8]), atol=2e-4, rtol=1e-4)
    for pos in range(8, 12):
        # Row 0 continues sequence b and row 1 sequence a: the caches must follow beam_idx.
        beam = np.array([1, 0] if pos == 8 else [0, 1], np.int32)
        out = request.infer({"input_ids": np.array([[b[pos]], [a[pos]]], np.int64),
                             "attention_mask": np.ones((2, pos + 1), np.int64),
                             "position_ids": np.full((2, 1), pos, np.int64), "beam_idx": beam})["logits"]
        np.testing.assert_allclose(out[0], ref_b.forward([b[pos]]), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(out[1], ref_a.forward([a[pos]]), atol=2e-4, rtol=1e-4)


def test_cpu_plugin_fuses_rms_rope_and_stateful_sdpa(checkpoints):
    model = build_model(open_tiny(checkpoints("llama")))
    for props in (F32_CPU, {}):  # exact f32 and the plugin's default (bf16 where the CPU has it)
        runtime = ov.Core().compile_model(model, "CPU", props).get_runtime_model()
        kind = {op.get_friendly_name(): op.get_rt_info()["layerType"].astype(str) for op in runtime.get_ops()}
        types = list(kind.values())
        layers = 2
        assert types.count("RMS") == 2 * layers + 1, props
        assert types.count("RoPE") == 2 * layers, props
        sdpa = [op for op in runtime.get_ops() if op.get_rt_info()["layerType"].astype(str) == "ScaledDotProductAttention"]
        assert len(sdpa) == layers, props
        for op in sdpa:
            # Fused with the cache: the past K/V come straight from the state, with no
            # Gather/Concat left in between.
            sources = {kind[i.get_source_output().get_node().get_friendly_name()] for i in op.inputs()}
            assert "MemoryInput" in sources, (props, sources)


def test_paged_attention_pass_accepts_model_and_keeps_windows(checkpoints):
    from openvino._offline_transformations import paged_attention_transformation
    import openvino.opset13 as ops

    model = build_model(open_tiny(checkpoints("qwen2-bf16-window-upper-layers")))
    paged_attention_transformation(model)
    names = {p.get_friendly_name() for p in model.get_parameters()}
    assert "attention_mask" not in names and "beam_idx" not in names
    types = [op.get_type_name() for op in model.get_ordered_ops()]
    assert "ScaledDotProductAttention" not in types
    pa = [op for op in model.get_ordered_ops() if op.get_type_name() == "PagedAttentionExtension"]
    windows = ov.Model([ops.result(op.input_value(10)) for op in pa], [])
    got = [int(v) for v in ov.Core().compile_model(windows, "CPU")({}).values()]
    assert got == [0, WINDOW]  # layer 0 full attention, layer 1 windowed


_PIPELINE_SCRIPT = r"""
import json, sys
import numpy as np, openvino as ov, openvino_genai as og
path, backend, prompt, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
if backend != "default":
    props["ATTENTION_BACKEND"] = backend
pipe = og.LLMPipeline(path, "CPU", **props)
cfg = og.GenerationConfig(max_new_tokens=n, do_sample=False, ignore_eos=True)
ids = ov.Tensor(np.array([prompt], np.int64))
res = pipe.generate(og.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), np.int64))), cfg)
print("TOKENS", json.dumps([int(t) for t in res.tokens[0]]))
"""


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_llm_pipeline_greedy_tokens_match_reference(case, checkpoints, tmp_path):
    path = checkpoints(case)
    out = save_for_genai(build_model(open_tiny(path)), path, tmp_path / "ov")
    prompt, n = _tokens(PREFILL), TOTAL - PREFILL
    want = Reference(path).greedy(prompt, n)
    for backend in ("default", "SDPA"):
        # A subprocess, so that OPENVINO_LOG_LEVEL reaches GenAI's logger and its log can be read.
        run = subprocess.run([sys.executable, "-c", _PIPELINE_SCRIPT, str(out), backend, json.dumps(prompt), str(n)],
                             capture_output=True, text=True, env={**__import__("os").environ, "OPENVINO_LOG_LEVEL": "2"},
                             timeout=300)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-3000:]
        assert "Falling back to SDPA backend" not in log
        if backend == "default":
            assert "LLM with Paged Attention" in log
        got = json.loads(log.split("TOKENS ", 1)[1].splitlines()[0])
        assert got == want, f"{case} {backend}"


def test_phi3_mini_window_past_2047_tokens(tmp_path):
    """Phi-3-mini's own window (2047) and a sequence past it, where exported Phi-3 IRs are
    reported to go wrong: logits of the stateful model and LLMPipeline's tokens (paged attention)."""
    path = write_checkpoint(tmp_path / "phi3", "phi3", sliding_window=2047, max_position_embeddings=4096,
                            original_max_position_embeddings=4096, hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64)
    model = build_model(open_tiny(path))
    request = _compile(model).create_infer_request()
    ids = _tokens(2060, seed=3)
    ref, unwindowed = Reference(path), Reference(path)
    unwindowed.windows = [None] * len(unwindowed.windows)
    unwindowed.forward(ids[:2050])
    np.testing.assert_allclose(_step(request, ids[:2050], 0)[0][-5:], ref.forward(ids[:2050])[-5:],
                               atol=2e-4, rtol=1e-4)
    for pos in range(2050, 2060):
        want = ref.forward(ids[pos:pos + 1])
        np.testing.assert_allclose(_step(request, ids[pos:pos + 1], pos)[0], want,
                                   atol=2e-4, rtol=1e-4, err_msg=f"decode at {pos}")
        # The window matters here by far more than the tolerance.
        assert np.abs(want - unwindowed.forward(ids[pos:pos + 1])).max() > 1e-2

    out = save_for_genai(model, path, tmp_path / "ov")
    prompt, n = ids[:2045], 8  # generation crosses the window
    run = subprocess.run([sys.executable, "-c", _PIPELINE_SCRIPT, str(out), "default", json.dumps(prompt), str(n)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.split("TOKENS ", 1)[1].splitlines()[0])
    assert got == Reference(path).greedy(prompt, n)


def test_progress_reports_each_layer(checkpoints):
    seen = []
    build_model(open_tiny(checkpoints("llama")), progress=seen.append)
    layers = [p for p in seen if p.stage == "build" and p.total]
    assert [(p.done, p.total) for p in layers] == [(1, 2), (2, 2)]
    assert all(isinstance(p, Progress) for p in seen)


def test_model_interface(checkpoints):
    model = build_model(open_tiny(checkpoints("qwen2-bias-tied")))
    assert [i.get_any_name() for i in model.inputs] == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert [o.get_any_name() for o in model.outputs] == ["logits"]
    assert model.output(0).get_node().input_value(0).get_node().get_type_name() == "MatMul"
    assert len(model.get_sinks()) == 2 * 2
    # Tied embeddings: one shared Constant feeds both the embedding Gather and lm_head.
    consts = [op for op in model.get_ordered_ops() if op.get_friendly_name() == "model.embed_tokens.weight"]
    assert len(consts) == 1
    assert not any(op.get_friendly_name() == "lm_head.weight" for op in model.get_ordered_ops())


def test_bf16_weights_stay_bf16_and_share_checkpoint_memory(checkpoints):
    ckpt = open_tiny(checkpoints("phi3-bf16-sharded-window"))
    model = build_model(ckpt)
    consts = {op.get_friendly_name(): op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}
    q = consts["model.layers.0.self_attn.q_proj.weight"]
    assert q.get_element_type() == ov.Type.bf16
    qkv = ckpt.get("model.layers.0.self_attn.qkv_proj.weight").array
    # The split q rows are a view of the memory-mapped fused tensor, not a copy.
    assert q.get_data().ctypes.data == qkv.ctypes.data


def test_unsupported_architecture_lists_supported(tmp_path):
    path = write_checkpoint(tmp_path / "m", "llama", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="Phi3ForCausalLM"):
        build_model(open_tiny(path))


def test_unsupported_rope_type(tmp_path):
    path = write_checkpoint(tmp_path / "m", "llama", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        build_model(open_tiny(path))


def test_missing_tensor_is_a_checkpoint_error(tmp_path):
    path = write_checkpoint(tmp_path / "m", "qwen2")
    ckpt = open_tiny(path)
    original_has = ckpt.has
    ckpt.has = lambda name: name != "model.layers.1.self_attn.k_proj.bias" and original_has(name)
    with pytest.raises(CheckpointError, match="k_proj.bias"):
        build_model(ckpt)


def test_rope_config_styles_agree():
    from ovchat.convert.graph import Rope

    old = Rope.from_config({"rope_theta": 500000.0, "rope_scaling": LLAMA3}, 16)
    new = Rope.from_config({"rope_parameters": {**LLAMA3, "rope_theta": 500000.0}}, 16)
    nested = Rope.from_config({"rope_parameters": {"full_attention": {**LLAMA3, "rope_theta": 500000.0}}}, 16)
    np.testing.assert_array_equal(old.inv_freq, new.inv_freq)
    np.testing.assert_array_equal(old.inv_freq, nested.inv_freq)
    assert not np.array_equal(old.inv_freq, Rope.from_config({"rope_theta": 500000.0}, 16).inv_freq)
