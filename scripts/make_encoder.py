#!/usr/bin/env python3
"""Write a tiny random sentence encoder in sentence-transformers' layout, without torch.

    python scripts/make_encoder.py OUT --arch mpnet

``--arch``: bert, mpnet, nomic_bert (transformers' names) or nomic_bert-original (nomic's own
names: Wqkv, fc11/fc12/fc2, norm1/norm2, emb_ln, and its GPT-2-style config). Besides config.json
and model.safetensors, the directory has a WordPiece tokenizer.json (built with the
``tokenizers`` package), modules.json, 1_Pooling/config.json and sentence_bert_config.json. The
tests convert these with ovchat and compare them with tests/convert_helpers' numpy reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import _write_safetensors  # noqa: E402

TINY = {
    "bert": {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 200, "max_position_embeddings": 64,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0},
    "mpnet": {"architectures": ["MPNetForMaskedLM"], "model_type": "mpnet", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 200, "max_position_embeddings": 66,
              "layer_norm_eps": 1e-5, "relative_attention_num_buckets": 32, "hidden_act": "gelu", "pad_token_id": 1,
              "bos_token_id": 0, "eos_token_id": 2},
    "nomic_bert": {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "hidden_size": 64,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 200,
                   "max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}, "hidden_act": "silu",
                   "pad_token_id": 0},
}
TINY["nomic_bert-original"] = {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "n_embd": 64,
                               "n_layer": 2, "n_head": 4, "n_inner": 96, "vocab_size": 200, "n_positions": 128,
                               "type_vocab_size": 2, "layer_norm_epsilon": 1e-12, "rotary_emb_base": 1000,
                               "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "prenorm": False,
                               "activation_function": "swiglu", "qkv_proj_bias": False, "mlp_fc1_bias": False,
                               "mlp_fc2_bias": False, "pad_token_id": 0}
# Specials first, in each model family's order (MPNet: <s> 0, <pad> 1, </s> 2; BERT: [PAD] 0...).
_SPECIALS = {"mpnet": ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]}
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ("the a of and to in is it that was he she for on are with as his her they at be this from have or by one "
          "had not but what all were when we there can an your which their said if do will each about how up out "
          "them then many some so these would other into has more two like him see time could no make than first "
          "been its who now people my made over did down only way find use may water long little very after word "
          "called just where most know get through back much before go good new write our used me man too any day "
          "same right look think also around another came come work three word must because does part even place "
          "well such here take why things help put years different away again off went old number great tell men "
          "say small every found still between name should home big give air line set own under read last never us "
          "left end along while might next sound below saw something thought both few those always looked show large "
          "often together asked house world going want school important until form food keep children feet land "
          "side without boy once animals life enough took sometimes four head above kind began almost live page got "
          "earth need far hand high year mother light parts country father let night following picture being study "
          "second eyes soon times story boys since white days ever paper hard near sentence better best across during "
          "today others however sure means knew its try told young miles sun ways thing whole hear example heard "
          "several change answer room sea against top turned learn point city play toward five using himself usually").split()


def tensors_of(arch: str, c: dict) -> List[tuple]:
    """(name, shape, kind) of every tensor of the tiny encoder."""
    original = arch == "nomic_bert-original"
    h = c.get("hidden_size") or c["n_embd"]
    layers = c.get("num_hidden_layers") or c["n_layer"]
    inter = c.get("intermediate_size") or c["n_inner"]
    out = [("embeddings.word_embeddings.weight", (c["vocab_size"], h), "embedding")]
    if arch == "bert":
        out += [("embeddings.position_embeddings.weight", (c["max_position_embeddings"], h), "embedding"),
                ("embeddings.token_type_embeddings.weight", (c["type_vocab_size"], h), "embedding"),
                ("embeddings.LayerNorm.weight", (h,), "norm"), ("embeddings.LayerNorm.bias", (h,), "bias")]
        for i in range(layers):
            p = f"encoder.layer.{i}"
            for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
                out += [(f"{p}.{part}.weight", (h, h), "matrix"), (f"{p}.{part}.bias", (h,), "bias")]
            out += [(f"{p}.attention.output.LayerNorm.weight", (h,), "norm"),
                    (f"{p}.attention.output.LayerNorm.bias", (h,), "bias"),
                    (f"{p}.intermediate.dense.weight", (inter, h), "matrix"), (f"{p}.intermediate.dense.bias", (inter,), "bias"),
                    (f"{p}.output.dense.weight", (h, inter), "matrix"), (f"{p}.output.dense.bias", (h,), "bias"),
                    (f"{p}.output.LayerNorm.weight", (h,), "norm"), (f"{p}.output.LayerNorm.bias", (h,), "bias")]
    elif arch == "mpnet":
        out += [("embeddings.position_embeddings.weight", (c["max_position_embeddings"], h), "embedding"),
                ("embeddings.LayerNorm.weight", (h,), "norm"), ("embeddings.LayerNorm.bias", (h,), "bias"),
                ("encoder.relative_attention_bias.weight", (c["relative_attention_num_buckets"],
                                                            c["num_attention_heads"]), "bias")]
        for i in range(layers):
            p = f"encoder.layer.{i}"
            for t in "qkvo":
                out += [(f"{p}.attention.attn.{t}.weight", (h, h), "matrix"), (f"{p}.attention.attn.{t}.bias", (h,), "bias")]
            out += [(f"{p}.attention.LayerNorm.weight", (h,), "norm"), (f"{p}.attention.LayerNorm.bias", (h,), "bias"),
                    (f"{p}.intermediate.dense.weight", (inter, h), "matrix"), (f"{p}.intermediate.dense.bias", (inter,), "bias"),
                    (f"{p}.output.dense.weight", (h, inter), "matrix"), (f"{p}.output.dense.bias", (h,), "bias"),
                    (f"{p}.output.LayerNorm.weight", (h,), "norm"), (f"{p}.output.LayerNorm.bias", (h,), "bias")]
    else:
        norm = "emb_ln" if original else "embeddings.LayerNorm"
        out += [("embeddings.token_type_embeddings.weight", (c["type_vocab_size"], h), "embedding"),
                (f"{norm}.weight", (h,), "norm"), (f"{norm}.bias", (h,), "bias")]
        for i in range(layers):
            if original:
                p = f"encoder.layers.{i}"
                out += [(f"{p}.attn.Wqkv.weight", (3 * h, h), "matrix"), (f"{p}.attn.out_proj.weight", (h, h), "matrix"),
                        (f"{p}.mlp.fc11.weight", (inter, h), "matrix"), (f"{p}.mlp.fc12.weight", (inter, h), "matrix"),
                        (f"{p}.mlp.fc2.weight", (h, inter), "matrix")]
                norms = ("norm1", "norm2")
            else:
                p = f"layers.{i}"
                out += [(f"{p}.self_attn.{t}_proj.weight", (h, h), "matrix") for t in "qkvo"]
                out += [(f"{p}.mlp.gate_proj.weight", (inter, h), "matrix"), (f"{p}.mlp.up_proj.weight", (inter, h), "matrix"),
                        (f"{p}.mlp.down_proj.weight", (h, inter), "matrix")]
                norms = ("post_attention_layernorm", "post_mlp_layernorm")
            for n in norms:
                out += [(f"{p}.{n}.weight", (h,), "norm"), (f"{p}.{n}.bias", (h,), "bias")]
    return out


def wordpiece_tokenizer(arch: str, vocab_size: int):
    """A WordPiece tokenizer of exactly ``vocab_size`` entries: the family's specials, letters and
    digits (word-initial and ##continuations), then whole words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = _SPECIALS.get(arch, _BERT_SPECIALS)
    vocab: Dict[str, int] = {t: i for i, t in enumerate(specials)}
    pieces = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    for piece in pieces + ["##" + p for p in pieces if p.isalnum()] + list(_WORDS):
        if len(vocab) < vocab_size and piece not in vocab:
            vocab[piece] = len(vocab)
    unk = specials[3] if arch == "mpnet" else "[UNK]"
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = (specials[0], specials[2]) if arch == "mpnet" else ("[CLS]", "[SEP]")
    tok.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                                       special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    return tok, vocab


def write_encoder(directory, arch: str, *, seed: int = 0, pooling: str = "mean", normalize: bool = True,
                  max_seq_length: Optional[int] = None, dtype: str = "f32", **overrides) -> Path:
    """Write a tiny random encoder of ``arch`` in sentence-transformers' layout; return its path.
    ``dtype`` f16 stores the weights as f16 (an fp16 conversion then holds them exactly)."""
    config = {**TINY[arch], **overrides}
    out = Path(directory)
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = tensors_of(arch, config)
    shapes = {name: shape for name, shape, _ in specs}
    kinds = {name: kind for name, _, kind in specs}

    def make(name: str) -> np.ndarray:
        shape, kind = shapes[name], kinds[name]
        if kind == "norm":
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if kind == "embedding":
            return (0.5 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def stored(name: str) -> np.ndarray:
        return make(name).astype(np.float16 if dtype == "f16" else np.float32)

    _write_safetensors(out / "model.safetensors", [(n, shapes[n]) for n, _, _ in specs], dtype, stored)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer, vocab = wordpiece_tokenizer(arch.split("-")[0], config["vocab_size"])
    tokenizer.save(str(out / "tokenizer.json"))
    specials = _SPECIALS.get(arch, _BERT_SPECIALS)
    names = ({"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>",
              "unk_token": "[UNK]", "mask_token": "<mask>"} if arch == "mpnet" else
             {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
              "mask_token": "[MASK]"})
    assert set(names.values()) <= set(specials)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "do_lower_case": True, **names}, indent=2))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config.get("hidden_size") or config["n_embd"],
        "pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": pooling == "last"}, indent=2))
    if max_seq_length is not None:
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                   "do_lower_case": False}))
    return out


def write_encoder_gguf(path: Path, hf_dir: Path, qtype: str = "F32", pooling: int = 1) -> Path:
    """The encoder at ``hf_dir`` as llama.cpp's converter writes it: tensor names from gguf-py's
    own tensor map, the WordPiece vocabulary in llama.cpp's "phantom space" form (a word-initial
    piece gets U+2581, a continuation loses its "##"), the pooling type (1 mean, 2 CLS) in the
    metadata. bert and nomic-bert (nomic's names); matrices in ``qtype``, the rest F32."""
    import gguf
    from tokenizers import Tokenizer

    from ovchat.convert import safetensors

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = "nomic-bert" if config["model_type"] == "nomic_bert" else "bert"
    kind = gguf.MODEL_ARCH.NOMIC_BERT if arch == "nomic-bert" else gguf.MODEL_ARCH.BERT
    layers = config.get("num_hidden_layers") or config["n_layer"]
    names = gguf.get_tensor_name_map(kind, layers)
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {"embedding_length": config.get("hidden_size") or config["n_embd"], "block_count": layers,
                "attention.head_count": config.get("num_attention_heads") or config["n_head"],
                "feed_forward_length": config.get("intermediate_size") or config["n_inner"],
                "context_length": config.get("max_position_embeddings") or config.get("n_positions"),
                "pooling_type": pooling}
    for key, value in metadata.items():
        writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_float32(f"{arch}.attention.layer_norm_epsilon",
                       float(config.get("layer_norm_eps") or config["layer_norm_epsilon"]))
    writer.add_bool(f"{arch}.attention.causal", False)
    if arch == "nomic-bert":
        writer.add_float32(f"{arch}.rope.freq_base", float(config.get("rotary_emb_base") or 1000))
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    writer.add_string("tokenizer.ggml.model", "bert")
    writer.add_array("tokenizer.ggml.tokens",
                     [t if t in specials else t[2:] if t.startswith("##") else "\u2581" + t for t, _ in vocab])
    writer.add_array("tokenizer.ggml.token_type", [3 if t in specials else 1 for t, _ in vocab])
    if "type_vocab_size" in config:  # llama.cpp refuses a BERT without it, as its converter writes it
        writer.add_token_type_count(int(config["type_vocab_size"]))
    for key, token in (("cls_token_id", "[CLS]"), ("seperator_token_id", "[SEP]"), ("padding_token_id", "[PAD]"),
                       ("unknown_token_id", "[UNK]")):
        writer.add_uint32(f"tokenizer.ggml.{key}", tok.token_to_id(token))
    for name, weight in safetensors.load(hf_dir / "model.safetensors").items():
        stem, _, part = name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise ValueError(f"{name} has no llama.cpp name")
        array = weight.to_float32()
        kind_of = qtype if array.ndim == 2 and "embd" not in mapped and "types" not in mapped else "F32"
        if kind_of in ("F32", "F16"):
            writer.add_tensor(f"{mapped}.{part}", array.astype(np.float32 if kind_of == "F32" else np.float16))
        else:
            quant = getattr(gguf.GGMLQuantizationType, kind_of)
            writer.add_tensor(f"{mapped}.{part}", gguf.quants.quantize(array, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", choices=sorted(TINY), default="bert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooling", choices=["mean", "cls", "last"], default="mean")
    args = parser.parse_args(argv)
    print(write_encoder(args.output, args.arch, seed=args.seed, pooling=args.pooling))
    return 0


if __name__ == "__main__":
    sys.exit(main())
