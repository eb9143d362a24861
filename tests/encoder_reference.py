"""An independent float64 forward pass of the sentence encoders ovchat converts (BERT, MPNet,
nomic-bert), written from transformers' modeling code (modeling_bert, modeling_mpnet,
modeling_nomic_bert) and nomic's original checkpoint names, without ovchat.convert. The tests
compare ovchat's IRs with it, on tiny random checkpoints and on the real all-mpnet-base-v2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from scipy.special import erf

from ovchat.convert import safetensors


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def mpnet_bucket(relative: np.ndarray, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """transformers' MPNetEncoder.relative_position_bucket, step for step (float32 where torch is)."""
    n = -relative
    num_buckets //= 2
    ret = (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # n = 0 is always small; its log (torch's -inf) is never used and would not cast.
    logs = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    val_if_large = max_exact + (logs / np.float32(math.log(max_distance / max_exact))
                                * np.float32(num_buckets - max_exact)).astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


class EncoderReference:
    """``hidden(ids, mask)`` -> every token's last hidden state [B, L, H] in float64."""

    def __init__(self, path: Path, tensors: Optional[Dict[str, np.ndarray]] = None):
        path = Path(path)
        self.config = c = json.loads((path / "config.json").read_text())
        if tensors is None:
            tensors = {n: w.to_float32() for n, w in safetensors.load(path / "model.safetensors").items()
                       if w.dtype in ("f32", "f16", "bf16")}
        prefix = next((p for p in ("mpnet.", "bert.") if any(n.startswith(p) for n in tensors)), "")
        self.w = {n[len(prefix):]: np.asarray(t, np.float64) for n, t in tensors.items()}
        self.arch = c["model_type"]
        self.hidden_size = c.get("hidden_size") or c["n_embd"]
        self.heads = c.get("num_attention_heads") or c["n_head"]
        self.layers = c.get("num_hidden_layers") or c["n_layer"]
        self.eps = c.get("layer_norm_eps") or c.get("layer_norm_epsilon") or 1e-12

    def _attention(self, x, q, k, v, bias):
        b, length, _ = x.shape
        d = self.hidden_size // self.heads

        def heads(t):
            return t.reshape(b, length, self.heads, d).transpose(0, 2, 1, 3)

        scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        return (_softmax(scores) @ heads(v)).transpose(0, 2, 1, 3).reshape(b, length, -1)

    def hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w, c = self.w, self.config
        b, length = ids.shape
        padding = np.where(mask[:, None, None, :] > 0, 0.0, -np.inf)
        if self.arch == "mpnet":
            pad = c.get("pad_token_id", 1)
            real = (ids != pad).astype(np.int64)
            positions = np.cumsum(real, 1) * real + pad
            x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][positions]
            x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
            context, memory = np.arange(length)[:, None], np.arange(length)[None, :]
            buckets = mpnet_bucket(memory - context, c.get("relative_attention_num_buckets", 32))
            bias = w["encoder.relative_attention_bias.weight"][buckets].transpose(2, 0, 1)[None] + padding
            for i in range(self.layers):
                p = f"encoder.layer.{i}"

                def lin(name, t):
                    return t @ w[f"{p}.{name}.weight"].T + w[f"{p}.{name}.bias"]

                a = self._attention(x, lin("attention.attn.q", x), lin("attention.attn.k", x), lin("attention.attn.v", x),
                                    bias)
                x = _layer_norm(lin("attention.attn.o", a) + x, w[f"{p}.attention.LayerNorm.weight"],
                                w[f"{p}.attention.LayerNorm.bias"], self.eps)
                h = lin("output.dense", _gelu(lin("intermediate.dense", x)))
                x = _layer_norm(h + x, w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"], self.eps)
            return x
        if self.arch == "bert":
            x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length][None]
                 + w["embeddings.token_type_embeddings.weight"][0])
            x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
            for i in range(self.layers):
                p = f"encoder.layer.{i}"

                def lin(name, t):
                    return t @ w[f"{p}.{name}.weight"].T + w[f"{p}.{name}.bias"]

                a = self._attention(x, lin("attention.self.query", x), lin("attention.self.key", x),
                                    lin("attention.self.value", x), padding)
                x = _layer_norm(lin("attention.output.dense", a) + x, w[f"{p}.attention.output.LayerNorm.weight"],
                                w[f"{p}.attention.output.LayerNorm.bias"], self.eps)
                h = _gelu(lin("intermediate.dense", x))
                if c.get("hidden_act") in ("gelu_new", "gelu_pytorch_tanh"):
                    raw = lin("intermediate.dense", x)
                    h = 0.5 * raw * (1 + np.tanh(math.sqrt(2 / math.pi) * (raw + 0.044715 * raw ** 3)))
                x = _layer_norm(lin("output.dense", h) + x, w[f"{p}.output.LayerNorm.weight"],
                                w[f"{p}.output.LayerNorm.bias"], self.eps)
            return x
        # nomic-bert, in either spelling: rotary positions, SwiGLU, no biases but the norms'.
        original = "emb_ln.weight" in w
        norm = "emb_ln" if original else "embeddings.LayerNorm"
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w[f"{norm}.weight"], w[f"{norm}.bias"], self.eps)
        d = self.hidden_size // self.heads
        base = c.get("rotary_emb_base") or (c.get("rope_parameters") or {}).get("rope_theta") or 1000.0
        inv = 1.0 / base ** (np.arange(0, d, 2) / d)
        angles = np.arange(length)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

        def rope(t):  # [B, L, H*d] -> rotated per head, rotate-half
            t = t.reshape(b, length, self.heads, d)
            half = np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1)
            return (t * cos[None, :, None] + half * sin[None, :, None]).reshape(b, length, -1)

        for i in range(self.layers):
            if original:
                p = f"encoder.layers.{i}"
                q, k, v = np.split(x @ w[f"{p}.attn.Wqkv.weight"].T, 3, axis=-1)
                out, up, gate, down = (w[f"{p}.attn.out_proj.weight"], w[f"{p}.mlp.fc11.weight"],
                                       w[f"{p}.mlp.fc12.weight"], w[f"{p}.mlp.fc2.weight"])
                n1, n2 = f"{p}.norm1", f"{p}.norm2"
            else:
                p = f"layers.{i}"
                q, k, v = (x @ w[f"{p}.self_attn.{t}_proj.weight"].T for t in "qkv")
                out, up, gate, down = (w[f"{p}.self_attn.o_proj.weight"], w[f"{p}.mlp.up_proj.weight"],
                                       w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.down_proj.weight"])
                n1, n2 = f"{p}.post_attention_layernorm", f"{p}.post_mlp_layernorm"
            a = self._attention(x, rope(q), rope(k), v, padding)
            x = _layer_norm(a @ out.T + x, w[f"{n1}.weight"], w[f"{n1}.bias"], self.eps)
            g = x @ gate.T
            h = ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T
            x = _layer_norm(h + x, w[f"{n2}.weight"], w[f"{n2}.bias"], self.eps)
        return x

    def embed(self, ids: np.ndarray, mask: np.ndarray, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
        states = self.hidden(ids, mask)
        if pooling == "cls":
            vectors = states[:, 0]
        elif pooling == "last":
            vectors = states[np.arange(len(ids)), mask.sum(1) - 1]
        else:
            vectors = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True) if normalize else vectors
