"""Checkpoint readers: HF safetensors (single, sharded, bf16), GGUF (quant types, permutation,
metadata), OV IR, and the errors for broken input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from convert_helpers import (demo_gguf, llama_cpp_permute, llama_gguf_from_hf, llama_tensors, write_gguf,  # noqa: F401
                             tiny_llama_config, write_gguf, write_hf_checkpoint)
from ovchat.convert.sources import open_checkpoint
from ovchat.convert.gguf import unpermute_rows
from ovchat.errors import CheckpointError, UnsupportedArchitectureError

# ---------------------------------------------------------------------------------------------
# Hugging Face directories


@pytest.mark.parametrize("shards,bf16", [(1, False), (3, False), (2, True)])
def test_hf_checkpoint_reads_every_tensor(tmp_path, shards, bf16):
    config = tiny_llama_config(vocab_size=64)
    tensors = llama_tensors(config)
    write_hf_checkpoint(tmp_path, config, tensors, shards=shards, bf16=bf16)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.kind == "hf" and ckpt.architecture == "LlamaForCausalLM"
    assert sorted(ckpt.names()) == sorted(tensors)
    assert ckpt.has("model.norm.weight") and not ckpt.has("lm_head.weight")
    for name, expect in tensors.items():
        w = ckpt.get(name)
        assert w.dtype == ("bf16" if bf16 else "f32") and w.shape == expect.shape
        # bf16 keeps 8 mantissa bits: relative error below 2^-8.
        np.testing.assert_allclose(w.to_float32(), expect, rtol=2 ** -8 if bf16 else 0, atol=1e-30)
    files = {p.name for p in ckpt.files}
    assert "config.json" in files and sum(f.endswith(".safetensors") for f in files) == shards
    if shards > 1:
        assert "model.safetensors.index.json" in files


def test_hf_safetensors_is_memory_mapped(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    write_hf_checkpoint(tmp_path, config, llama_tensors(config))
    w = open_checkpoint(tmp_path).get("model.embed_tokens.weight")
    assert isinstance(w.array.base, np.memmap) or isinstance(w.array, np.memmap)


def test_hf_rope_parameters_style_is_normalized(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}
    write_hf_checkpoint(tmp_path, config, llama_tensors(config))
    c = open_checkpoint(tmp_path).config
    assert c["rope_theta"] == 500000.0
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_scaling"]["factor"] == 8.0


def test_hf_missing_config(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    write_hf_checkpoint(tmp_path, config, llama_tensors(config))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_hf_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="safetensors version"):
        open_checkpoint(tmp_path)


def test_hf_missing_shard(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    write_hf_checkpoint(tmp_path, config, llama_tensors(config), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(tmp_path)


def test_hf_truncated_safetensors(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    write_hf_checkpoint(tmp_path, config, llama_tensors(config))
    f = tmp_path / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path)


def test_hf_unknown_architecture(tmp_path):
    config = tiny_llama_config(vocab_size=64, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    write_hf_checkpoint(tmp_path, config, llama_tensors(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        open_checkpoint(tmp_path)


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="not a GGUF"):
        open_checkpoint(tmp_path / "x.gguf")


# ---------------------------------------------------------------------------------------------
# GGUF


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(1)
    for n_head, hd in ((4, 8), (3, 64)):
        w = rng.standard_normal((n_head * hd, 16)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
        b = rng.standard_normal(n_head * hd).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(b, n_head), n_head), b)


def test_gguf_llama_round_trip_to_hf_layout(tmp_path):
    config = tiny_llama_config(vocab_size=64, tie_word_embeddings=False)
    tensors = llama_tensors(config)
    ckpt = open_checkpoint(llama_gguf_from_hf(tmp_path / "m.gguf", config, tensors, "F32"))
    assert ckpt.kind == "gguf"
    assert sorted(ckpt.names()) == sorted(tensors)
    for name, expect in tensors.items():
        # Q and K come back un-permuted, i.e. exactly in the Hugging Face layout.
        np.testing.assert_array_equal(ckpt.get(name).to_float32(), expect, err_msg=name)
    c = ckpt.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings"):
        assert c[key] == config[key], key
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"


@pytest.mark.parametrize("qtype,tol", [("F16", 1e-3), ("Q8_0", 0.01), ("Q4_0", 0.15), ("Q4_1", 0.15)])
def test_gguf_quantized_tensors_dequantize(tmp_path, qtype, tol):
    import gguf

    config = tiny_llama_config(vocab_size=64, hidden_size=64, intermediate_size=128, head_dim=16)
    tensors = llama_tensors(config)
    ckpt = open_checkpoint(llama_gguf_from_hf(tmp_path / "m.gguf", config, tensors, qtype))
    for name, expect in tensors.items():
        got = ckpt.get(name).to_float32()
        assert got.shape == expect.shape
        if expect.ndim == 2 and qtype != "F16":
            # Exactly what llama.cpp's own dequantization gives, back in Hugging Face row order.
            gt = gguf.GGMLQuantizationType[qtype]
            src = expect
            if name.endswith("q_proj.weight"):
                src = llama_cpp_permute(expect, config["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                src = llama_cpp_permute(expect, config["num_key_value_heads"])
            ref = gguf.quants.dequantize(gguf.quants.quantize(src, gt), gt)
            if src is not expect:
                ref = unpermute_rows(ref, config["num_attention_heads" if "q_proj" in name
                                                 else "num_key_value_heads"])
            np.testing.assert_array_equal(got, ref.astype(np.float16).astype(np.float32), err_msg=name)
        np.testing.assert_allclose(got, expect, atol=tol * np.abs(expect).max(), err_msg=name)


@pytest.mark.parametrize("qtype", ["BF16", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_raw_types_read(tmp_path, qtype):
    """Types gguf-py cannot quantize: raw blocks are written and must read as llama.cpp dequantizes them."""
    import gguf

    gt = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[gt]
    rows, cols = 8, 256
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    if qtype != "BF16":
        # Keep the f16 super-block scales finite and small (they sit at known offsets).
        scale_at = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (size - 2,)}[qtype]
        blocks = raw.reshape(rows, -1, size)
        for off in scale_at:
            blocks[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    else:
        raw.view(np.uint16)[:] = (raw.view(np.uint16) & 0x3FFF)  # finite bf16 values
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for k, v in {"block_count": 1, "embedding_length": cols, "attention.head_count": 2}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_tensor("token_embd.weight", raw, raw_dtype=gt)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ckpt = open_checkpoint(tmp_path / "m.gguf")
    got = ckpt.get("model.embed_tokens.weight")
    assert got.shape == (rows, cols)
    expect = gguf.quants.dequantize(raw, gt)
    if qtype != "BF16":
        expect = expect.astype(np.float16).astype(np.float32)  # dequantized into f16
    np.testing.assert_array_equal(got.to_float32(), expect)
    assert np.isfinite(expect).all()


def test_gguf_type_the_gguf_package_cannot_read_is_a_clear_error(tmp_path):
    """Q8_K (llama.cpp's intermediate type) has no dequantization in gguf: the error names the
    tensor, its type and what is readable."""
    import gguf

    rows, size = 64, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]
    raw = np.zeros((rows, size), np.uint8)
    path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": (raw, "Q8_K")},
                      {"block_count": 1, "embedding_length": 256, "attention.head_count": 4})
    with pytest.raises(CheckpointError, match=r"token_embd.weight has type Q8_K.*reads .*IQ2_XXS.*Q4_K.*Q5_0"):
        open_checkpoint(path)


@pytest.mark.parametrize("cut", ["tensor data", "metadata"])
def test_gguf_truncated(tmp_path, cut):
    config = tiny_llama_config(vocab_size=64)
    path = llama_gguf_from_hf(tmp_path / "m.gguf", config, llama_tensors(config), "Q8_0")
    os.truncate(path, path.stat().st_size - 1000 if cut == "tensor data" else 200)
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_gguf_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gptneox", {"token_embd.weight": (np.zeros((4, 32)), "F32")},
                      {"block_count": 1})
    with pytest.raises(UnsupportedArchitectureError, match="gptneox.*llama"):
        open_checkpoint(path)


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
    config = tiny_llama_config(vocab_size=64, head_dim=64, hidden_size=256, num_attention_heads=4,
                               num_key_value_heads=2, rope_theta=500000.0)
    tensors = llama_tensors(config)
    # llama.cpp's table for Llama 3.1 (factor 8, low 1, high 4, original context 8192).
    inv = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1) / 3
    freqs = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    path = llama_gguf_from_hf(tmp_path / "m.gguf", config, tensors, "F32")
    # Rewrite with the extra tensor appended.
    import gguf

    r = gguf.GGUFReader(str(path))
    out = {t.name: (np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))), "F32") for t in r.tensors}
    out["rope_freqs.weight"] = (freqs.astype(np.float32), "F32")
    meta = {k.split(".", 1)[1]: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    meta = {k: (float(v) if isinstance(v, float) else v) for k, v in meta.items()}
    path2 = write_gguf(tmp_path / "m2.gguf", "llama", out, meta)
    c = open_checkpoint(path2).config
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in open_checkpoint(path2).names()


def test_demo_gguf_every_tensor_reads_and_config_translates(demo_gguf):
    ckpt = open_checkpoint(demo_gguf)
    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (576, 1536, 30)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192 and c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True and not ckpt.has("lm_head.weight")
    assert ckpt.generation_config["eos_token_id"] == [2] and c["bos_token_id"] == 1
    assert len(ckpt.names()) == 2 + 30 * 9
    total = 0
    for name in ckpt.names():
        w = ckpt.get(name)
        assert np.isfinite(w.to_float32()).all(), name
        total += w.array.size
    assert total == 134_515_008
    assert ckpt.get("model.layers.0.self_attn.q_proj.weight").shape == (576, 576)
    assert ckpt.get("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)


def _resident_kib(array: np.ndarray) -> int:
    """The resident size of the mapping that holds ``array`` (/proc/self/smaps)."""
    addr, inside = array.ctypes.data, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="page dropping is Linux-only")
def test_gguf_drop_weight_pages_frees_what_dequantizing_read_and_keeps_it_readable(demo_gguf):
    # convert() relies on this to keep a GGUF's pages out of the resident set while compressing.
    ckpt = open_checkpoint(demo_gguf)
    name = "model.layers.0.self_attn.q_proj.weight"
    expect = ckpt.get(name).array.copy()
    for n in ckpt.names():
        ckpt.get(n)
    size_kib = demo_gguf.stat().st_size // 1024
    mapped = np.frombuffer(ckpt.file.mapping, dtype=np.uint8)  # the whole file, as the reader maps it
    assert _resident_kib(mapped) > 0.9 * size_kib
    ckpt.drop_weight_pages()
    assert _resident_kib(mapped) < 0.05 * size_kib
    assert len(ckpt.field("tokenizer.ggml.tokens")) == 49152
    np.testing.assert_array_equal(ckpt.get(name).array, expect)


# ---------------------------------------------------------------------------------------------
# OpenVINO IR directories


def test_ov_ir_directory(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 64], np.float32, name="x")
    m = ov.Model([ops.matmul(x, ops.constant(np.ones((64, 64), np.float32)), False, True)], [x])
    ov.save_model(m, tmp_path / "openvino_model.xml", compress_to_fp16=False)
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config()))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.kind == "ov" and ckpt.config["hidden_size"] == 32
    assert {p.name for p in ckpt.files} >= {"openvino_model.xml", "openvino_model.bin", "config.json"}
    (tmp_path / "openvino_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no openvino_model.bin"):
        open_checkpoint(tmp_path)
