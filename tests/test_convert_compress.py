"""compress(): the NNCF recipes on tiny built models, the bitwidth table, group-size fallback,
recipe validation, and NNCF kept off stdout."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from convert_helpers import F32_CPU, open_tiny, write_checkpoint

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ovchat.convert.compress import Recipe, bitwidth_distribution, compress  # noqa: E402
from ovchat.render import format_distribution  # noqa: E402
from ovchat.convert.models import build_model  # noqa: E402
from ovchat.errors import OptionError  # noqa: E402

IDS = [5, 17, 42, 99, 7, 250, 31, 64]


def _model(tmp_path, name="m", **config):
    spec = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    spec.update(config)
    ckpt = open_tiny(write_checkpoint(tmp_path / name, "llama", **spec))
    model = build_model(ckpt)
    return model


def _logits(model):
    request = ov.Core().compile_model(model, "CPU", F32_CPU).create_infer_request()
    return request.infer({"input_ids": np.array([IDS], np.int64), "attention_mask": np.ones((1, len(IDS)), np.int64),
                          "position_ids": np.arange(len(IDS), dtype=np.int64)[None],
                          "beam_idx": np.zeros(1, np.int32)})["logits"][0].copy()


def _weight_types(model):
    """friendly name of each matrix weight Constant -> (element type, shape)."""
    return {op.get_friendly_name(): (op.get_element_type().get_type_name(), list(op.get_output_shape(0)))
            for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_friendly_name().endswith(".weight")
            and len(op.get_output_shape(0)) >= 2}


def _nncf_table(records):
    """NNCF's own bitwidth table, parsed from its (forwarded) log lines."""
    text = "\n".join(r.getMessage() for r in records if r.name == "ovchat.convert.compress")
    rows = re.findall(r"│ (\S[^│]*?)\s+│ (\d+)% \((\d+) / \d+\)\s+│ (\d+)% \((\d+) / \d+\)\s+│", text)
    return {label: tuple(int(v) for v in values) for label, *values in rows}


def test_default_recipe_int4_with_int8_backup_matches_nncf_table(tmp_path, caplog, capfd):
    model = _model(tmp_path, dtype="bf16")
    float_logits = _logits(model)
    seen = []
    with caplog.at_level(logging.DEBUG, logger="ovchat.convert.compress"):
        model, dist = compress(model, Recipe(), progress=seen.append)

    assert set(dist) == {"int8_asym, per-channel", "int4_sym, group size 128"}
    int4 = dist["int4_sym, group size 128"]
    assert 40 <= int4["ratio_defining_parameters_percent"] <= 75  # ratio 0.6, whole layers at a time
    assert dist["int8_asym, per-channel"]["layers"] + int4["layers"] == 2 * 7 + 2
    # The same numbers as NNCF's own table (which rounds to whole percent).
    table = _nncf_table(caplog.records)
    assert table, "NNCF's table was not forwarded to the log"
    for label, row in dist.items():
        p, n, rp, rn = table[label]
        assert abs(row["parameters_percent"] - p) <= 1 and row["layers"] == n
        assert abs(row["ratio_defining_parameters_percent"] - rp) <= 1 and row["ratio_defining_layers"] == rn

    types = _weight_types(model)
    assert types["model.embed_tokens.weight"][0] == "u8"   # embeddings and lm_head stay in the backup
    assert types["lm_head.weight"][0] == "u8"
    assert {t for t, shape in types.values() if t == "i4" and shape[-1] == 128} == {"i4"}
    # Still the same model: int4/int8 noise (large on random weights, which have no structure to
    # keep), not garbage.
    got = _logits(model)
    assert np.corrcoef(got.ravel(), float_logits.ravel())[0, 1] > 0.95
    # NNCF printed nothing; its progress came through the callback.
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    bars = [p for p in seen if p.stage == "compress" and p.total]
    assert bars and bars[-1].done == bars[-1].total


def test_nncf_logging_and_progress_bars_are_restored(tmp_path):
    import nncf.quantization.algorithms.weight_compression.algorithm as algorithm

    handlers, track = list(logging.getLogger("nncf").handlers), algorithm.track
    compress(_model(tmp_path), Recipe(weight_format="int8"))
    assert logging.getLogger("nncf").handlers == handlers
    assert algorithm.track is track


@pytest.mark.parametrize("sym, mode, weight_type", [(False, "int8_asym", "u8"), (True, "int8_sym", "i8")])
def test_int8(tmp_path, sym, mode, weight_type):
    model = _model(tmp_path)
    float_logits = _logits(model)
    model, dist = compress(model, Recipe(weight_format="int8", sym=sym))
    assert list(dist) == [f"{mode}, per-channel"]
    assert dist[f"{mode}, per-channel"]["parameters_percent"] == 100.0
    assert {t for t, _ in _weight_types(model).values()} == {weight_type}
    np.testing.assert_allclose(_logits(model), float_logits, atol=0.05 * np.abs(float_logits).max())


def test_int4_asym(tmp_path):
    _, dist = compress(_model(tmp_path), Recipe(sym=False))
    assert "int4_asym, group size 128" in dist


def test_fp16_keeps_float_and_turns_bf16_into_f16(tmp_path):
    model = _model(tmp_path, dtype="bf16")
    float_logits = _logits(model)
    model, dist = compress(model, Recipe(weight_format="fp16"))
    assert list(dist) == ["fp16"]
    assert {t for t, _ in _weight_types(model).values()} == {"f16"}
    np.testing.assert_allclose(_logits(model), float_logits, atol=0.02 * np.abs(float_logits).max())


def test_group_size_fallback_adjust_uses_smaller_groups(tmp_path):
    # hidden size 96 (like SmolLM2's 576) is not a multiple of 128: q/k/v/o/gate/up cannot use it.
    seen = []
    model, dist = compress(_model(tmp_path, hidden_size=96), Recipe(), progress=seen.append)
    assert "int4_sym, group size 32" in dist
    shapes = [shape for t, shape in _weight_types(model).values() if t == "i4"]
    assert shapes and all(s[-1] in (32, 128) for s in shapes)
    assert any("--group-size-fallback adjust" in p.message for p in seen)
    assert np.isfinite(_logits(model)).all()


def test_group_size_fallback_ignore_keeps_those_layers_float(tmp_path):
    seen = []
    model, dist = compress(_model(tmp_path, hidden_size=96), Recipe(group_size_fallback="ignore"),
                           progress=seen.append)
    assert dist["float"]["layers"] == 2 * 6  # q, k, v, o, gate, up of both layers
    assert dist["float"]["ratio_defining_layers"] == 0
    types = _weight_types(model)
    assert types["model.layers.0.self_attn.q_proj.weight"][0] == "f32"
    assert any("--group-size-fallback ignore" in p.message for p in seen)


def test_group_size_fallback_error_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match="--group-size-fallback"):
        compress(_model(tmp_path, hidden_size=96), Recipe(group_size_fallback="error"))


@pytest.mark.parametrize("bad", [
    dict(weight_format="int3"), dict(weight_format="INT4"), dict(sym="yes"), dict(group_size=0),
    dict(group_size=-2), dict(group_size=64.0), dict(ratio=-0.1), dict(ratio=1.5), dict(ratio="0.6"),
    dict(group_size_fallback="shrink"),
])
def test_bad_recipe_values_raise_option_error(bad):
    with pytest.raises(OptionError):
        Recipe(**bad)


def test_recipe_defaults_are_the_mission_recipe_for_float_sources_and_keep_for_quantized_ones():
    r = Recipe()
    assert r.weight_format == "auto"
    float_source = r.resolve(quantized_source=False)
    assert (float_source.weight_format, float_source.sym, float_source.group_size, float_source.ratio,
            float_source.group_size_fallback) == ("int4", True, 128, 0.6, "adjust")
    assert float_source.mode == "int4_sym"
    assert r.resolve(quantized_source=True).weight_format == "keep"
    # A recipe named explicitly applies to a quantized source too; keep needs something to keep.
    assert Recipe(weight_format="int4").resolve(quantized_source=True).weight_format == "int4"
    with pytest.raises(OptionError, match="not quantized"):
        Recipe(weight_format="keep").resolve(quantized_source=False)
    assert Recipe(group_size=-1).group_size == -1


def test_distribution_of_a_float_model_and_format(tmp_path):
    dist = bitwidth_distribution(_model(tmp_path, tie_word_embeddings=True))
    # Tied embeddings: one weight, counted once.
    assert dist == {"float": {"layers": 2 * 7 + 1, "ratio_defining_layers": 0, "parameters_percent": 100.0,
                              "ratio_defining_parameters_percent": 0.0}}
    assert "float" in format_distribution(dist)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="page dropping is Linux-only")
def test_dropping_mapped_pages_keeps_values_and_spares_anonymous_memory(tmp_path):
    from ovchat.convert.compress import _MappedWeights

    model = _model(tmp_path, hidden_size=512, intermediate_size=1024)  # weights of >= 1 MiB
    ov.save_model(model, tmp_path / "float.xml", compress_to_fp16=False)
    read_back = ov.Core().read_model(tmp_path / "float.xml")
    before = _logits(read_back)
    mapped = _MappedWeights(read_back)
    assert mapped._ranges  # the IR's .bin is a read-only file mapping
    mapped.release()
    np.testing.assert_array_equal(_logits(read_back), before)

    # A model built from the memory-mapped checkpoint is file-backed too; one whose weights live
    # in ordinary (anonymous) memory has nothing to drop.
    assert _MappedWeights(_model(tmp_path, "built", hidden_size=512, intermediate_size=1024))._ranges
    import openvino.opset13 as ops
    x = ops.parameter([1, 512], np.float32)
    weight = ops.constant(np.random.default_rng(0).standard_normal((1024, 512), dtype=np.float32))
    anonymous = ov.Model([ops.result(ops.matmul(x, weight, False, True))], [x])
    assert not _MappedWeights(anonymous)._ranges


_GREEDY_DEFAULT_KV = r"""
import json, sys
import numpy as np, openvino as ov, openvino_genai as og
path, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
props = json.loads(sys.argv[4])
pipe = og.LLMPipeline(path, "CPU", **props)
cfg = og.GenerationConfig(max_new_tokens=n, do_sample=False, ignore_eos=True)
ids = ov.Tensor(np.array([prompt], np.int64))
res = pipe.generate(og.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), np.int64))), cfg)
print("TOKENS", json.dumps([int(t) for t in res.tokens[0]]))
"""


def test_fp16_conversion_asks_for_an_f16_kv_cache_and_runtimes_honour_it(tmp_path):
    """As optimum-cli does for fp16 exports: runtime_options KV_CACHE_PRECISION=f16 in the model's
    rt_info. The CPU's default u8 cache would cost this tiny Phi-3 (16-token window) its greedy tokens."""
    import json
    import subprocess
    import sys

    from convert_helpers import Reference, write_checkpoint
    from ovchat.convert import convert

    # Seed 6: with exact RoPE tables the u8 cache diverges at token 4 (seed 4 diverged only through the
    # f16-rounded frequencies the IR used to hold, and follows the reference with them exact).
    hf = write_checkpoint(tmp_path / "phi3", "phi3", seed=6, sliding_window=16)
    out = convert(hf, tmp_path / "fp16", recipe=Recipe(weight_format="fp16"), receipt=False)
    assert json.loads((out / "ovchat.json").read_text())["runtime_options"] == {"KV_CACHE_PRECISION": "f16"}
    compiled = ov.Core().compile_model(out / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.get_property("KV_CACHE_PRECISION") == ov.Type.f16

    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 300, size=12)]
    want = Reference(hf).greedy(prompt, 36)

    def greedy(props):
        run = subprocess.run([sys.executable, "-c", _GREEDY_DEFAULT_KV, str(out), json.dumps(prompt), "36",
                              json.dumps(props)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.split("TOKENS ", 1)[1].splitlines()[0])

    # LLMPipeline, told nothing about the cache, takes the model's f16 and follows the reference.
    assert greedy({"INFERENCE_PRECISION_HINT": "f32"}) == want
    # The setting matters: forced back to the CPU's default u8 cache, the tokens differ.
    assert greedy({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "u8"}) != want
