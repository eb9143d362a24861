"""Every GGUF tensor type the gguf package can dequantize is read, and a quantized GGUF keeps its
own blocks: the converted model's weights, as the CPU plugin decompresses them, equal gguf's own
dequantization of the file (bit for bit for the symmetric types; to float32 rounding of the offset
for the types with one, whose zero point is offset / scale)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import gguf_from_hf, hf_tensors_from_gguf, write_checkpoint, write_gguf

ov = pytest.importorskip("openvino")
gguf = pytest.importorskip("gguf")

from ovchat.convert.gguf import FLOAT_TYPES, readable_types  # noqa: E402
from ovchat.convert.quants import exact_form  # noqa: E402

QUANTIZED = [t for t in readable_types() if t not in FLOAT_TYPES]
# One layer whose every matrix has 256 columns: the block size of the K, IQ and TQ types.
SHAPE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=320, tie_word_embeddings=False)


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes in ``qtype``'s block layout, redrawn where they decode to non-finite, huge or
    denormal values (random scales can be inf, 60000 or 1e-39), so that any layout can be tested,
    including the types gguf cannot quantize."""
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for _ in range(500):
        with np.errstate(all="ignore"):
            values = gguf.quants.dequantize(raw, t).reshape(len(raw), block)
        tiny = (values != 0) & (np.abs(values) < 1e-30)  # denormals, which the CPU flushes to zero
        bad = ~np.isfinite(values).all(-1) | (np.abs(values).max(-1) > 4) | tiny.any(-1)
        if not bad.any():
            return raw.reshape(rows, -1)
        raw[bad] = rng.integers(0, 256, size=(int(bad.sum()), size), dtype=np.uint8)
    raise AssertionError(f"no sane random blocks for {qtype}")


def test_every_dequantizable_type_has_an_exact_form():
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
            "IQ2_XXS", "IQ1_S", "TQ2_0"} <= set(QUANTIZED)
    rng = np.random.default_rng(0)
    for qtype in QUANTIZED:
        raw = random_blocks(qtype, 4, 512, rng)
        form = exact_form(raw, qtype, (4, 512))
        assert form is not None, qtype
        want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(4, 512)
        _assert_exact(form.dequantize(), want, form.zero_point is not None, qtype)


def _assert_exact(got: np.ndarray, want: np.ndarray, has_offset: bool, what: str) -> None:
    if has_offset:
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -20 * np.abs(want).max(), err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def _decompressed(xml) -> dict:
    """Each MatMul/Gather weight of an IR as the CPU plugin computes it from the stored constants."""
    core = ov.Core()
    model = core.read_model(xml)
    import openvino.opset13 as ops

    out = {}
    for op in model.get_ordered_ops():
        port = {"MatMul": 1, "Gather": 0}.get(op.get_type_name())
        if port is None or op.input_value(port).get_node().get_type_name() == "Parameter":
            continue
        source = op.input_value(port).get_node()
        while source.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape"):
            source = source.input_value(0).get_node()
        if source.get_type_name() != "Constant" or len(source.get_output_shape(0)) < 2:
            continue  # not a weight (activations, rope tables)
        values = core.compile_model(ov.Model([ops.result(op.input_value(port))], []), "CPU",
                                    {"INFERENCE_PRECISION_HINT": "f32"})({})
        out[source.get_friendly_name()] = np.array(next(iter(values.values())))
    return out


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_a_gguf_of_each_type_converts_to_its_own_values(qtype, tmp_path):
    from ovchat.convert import convert

    hf = write_checkpoint(tmp_path / "hf", "llama", seed=1, **SHAPE)
    config = json.loads((hf / "config.json").read_text())
    rng = np.random.default_rng(abs(hash(qtype)) % 2**32)
    shapes = {"token_embd.weight": (320, 256), "output.weight": (320, 256)}
    shapes.update({f"blk.0.{p}.weight": (256, 256) for p in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                             "ffn_gate", "ffn_up", "ffn_down")})
    tensors = {name: (random_blocks(qtype, *shape, rng), qtype) for name, shape in shapes.items()}
    for norm in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        tensors[norm] = (np.ones(256, np.float32), "F32")
    model_gguf = tmp_path / "m.gguf"
    # The metadata and tokenizer of a model written by the helper, with these tensors.
    template = gguf_from_hf(tmp_path / "t.gguf", config, {}, tokenizer_json=hf / "tokenizer.json")
    reader = gguf.GGUFReader(str(template))
    meta = {k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    write_gguf(model_gguf, "llama", tensors, meta, tokenizer_from=template)

    out = convert(model_gguf, tmp_path / "ov", receipt=False)
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["recipe"]["weight_format"] == "keep"
    assert manifest["kept"][qtype]["tensors"] == len(shapes)
    form = manifest["kept"][qtype]["form"]
    assert not form.startswith("f16"), form  # an exact form exists for every type gguf reads
    want = hf_tensors_from_gguf(model_gguf)
    got = _decompressed(out / "openvino_model.xml")
    for name in want:
        if want[name].ndim == 2:
            _assert_exact(got[name], want[name], "asym" in form, f"{qtype} {name}")
