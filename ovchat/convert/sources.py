"""Checkpoint readers: one interface over Hugging Face directories, GGUF files and OpenVINO IRs.

Whatever the source, a ``Checkpoint`` presents a Hugging Face ``config.json``-style dict and the
weights under Hugging Face tensor names in Hugging Face layout, so the graph builders in
``ovchat.convert.models`` only ever deal with one naming scheme. Weights are read lazily, one
tensor per ``get()``: safetensors are memory-mapped, GGUF tensors are dequantized on demand.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ovchat.convert import safetensors
from ovchat.convert.safetensors import Weight
from ovchat.errors import CheckpointError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

HF_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                  "special_tokens_map.json")


class Checkpoint:
    """A model checkpoint on disk, seen through Hugging Face names and config keys."""

    kind: str = ""
    # How a missing tensor is reported: "{path}: tensor {name} is missing from <where>; <hint>".
    _missing = "the checkpoint; re-download it"

    def __init__(self, path: Path, config: dict, generation_config: Optional[dict], files: List[Path],
                 index: Optional[Dict[str, object]] = None):
        self.path = path
        self.config = config
        self.generation_config = generation_config
        self.files = files
        self._index = dict(index or {})  # HF tensor name -> where the reader finds it

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else ""

    def names(self) -> List[str]:
        return list(self._index)

    def has(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> Weight:
        raise NotImplementedError

    def _entry(self, name: str) -> object:
        """Where tensor ``name`` is stored, or CheckpointError if the checkpoint lacks it."""
        try:
            return self._index[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from {self._missing}") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.architecture} {self.path}>"


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


class HFCheckpoint(Checkpoint):
    kind = "hf"

    def __init__(self, path: Path, config: dict, generation_config: Optional[dict], files: List[Path],
                 owner: Dict[str, Path]):
        super().__init__(path, config, generation_config, files, owner)  # name -> its .safetensors
        self._loaded: Dict[Path, Dict[str, Weight]] = {}

    def get(self, name: str) -> Weight:
        file = self._entry(name)
        if file not in self._loaded:
            self._loaded[file] = safetensors.load(file)
        return self._loaded[file][name]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return data


def normalize_config(config: dict) -> dict:
    """Fill in the keys builders rely on that Hugging Face leaves to defaults or renamed.

    transformers 5 moved ``rope_theta``/``rope_scaling`` into ``rope_parameters``; both styles
    are accepted and the old names are always set.
    """
    config = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        # Per-layer-type dicts ({"full_attention": {...}}) are taken from the full-attention entry.
        if "rope_theta" not in params and isinstance(params.get("full_attention"), dict):
            params = params["full_attention"]
        if "rope_theta" in params:
            config.setdefault("rope_theta", params["rope_theta"])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if config.get("num_attention_heads") and config.get("hidden_size"):
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        if config.get("head_dim") is None:
            config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    return config


def _open_hf(path: Path) -> HFCheckpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; download the complete model directory")
    config = normalize_config(_read_json(config_path))

    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map; re-download it")
        shards = sorted({path / f for f in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path} lacks shard(s) {', '.join(missing)} listed in "
                                  f"{index_path.name}; download them")
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
            raise CheckpointError(f"{path} has only PyTorch .bin/.pt weights; download the "
                                  "safetensors version of the model")
        raise CheckpointError(f"{path} has no *.safetensors weights; download them")
    # Reading every header up front checks that no shard is truncated before any work starts.
    owner = safetensors.names(shards)
    if index_path.is_file():
        absent = [n for n, f in weight_map.items() if n not in owner]
        if absent:
            raise CheckpointError(f"{path}: tensor {absent[0]} (and {len(absent) - 1} more) listed in "
                                  f"{index_path.name} is in no shard; re-download the model")

    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = _read_json(path / "generation_config.json")
    files = [config_path] + ([index_path] if index_path.is_file() else []) + list(shards)
    files += [path / f for f in HF_EXTRA_FILES if (path / f).is_file()]
    return HFCheckpoint(path, config, generation_config, files, owner)


# ---------------------------------------------------------------------------------------------
# GGUF files

# GGUF general.architecture -> (Hugging Face architectures[0], model_type)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")

# GGUF per-block tensor suffix -> Hugging Face per-layer suffix.
_GGUF_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp adds that have no Hugging Face counterpart; their content goes into config.
_GGUF_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_to_hf_name(name: str, arch: str) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor, or None where there is none."""
    m = _BLOCK_RE.match(name)
    if m:
        layer, part, kind = m.groups()
        hf = _GGUF_BLOCK_NAMES.get(part)
        if hf is None:
            return None
        # Phi-3 GGUFs keep gate and up fused in ffn_up, as the Hugging Face checkpoint does.
        if arch == "phi3" and part == "ffn_up":
            hf = "mlp.gate_up_proj"
        return f"model.layers.{layer}.{hf}.{kind}"
    stem, _, kind = name.rpartition(".")
    hf = _GGUF_TOP_NAMES.get(stem)
    return f"{hf}.{kind}" if hf else None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    convert_hf_to_gguf interleaves the two rotary halves of each head (row i of the first half
    and row i of the second become rows 2i and 2i+1) for its interleaved RoPE; ovchat's graph
    uses rotate-half RoPE as Hugging Face does, so the halves are put back.
    """
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"
    _missing = "the GGUF file; use a complete GGUF"

    def __init__(self, path: Path, reader, arch: str, config: dict, generation_config: dict,
                 tensors: Dict[str, object]):
        super().__init__(path, config, generation_config, [path], tensors)  # name -> gguf ReaderTensor
        self.reader = reader
        self.gguf_architecture = arch

    def element_count(self, name: str) -> int:
        """How many values tensor ``name`` holds, without reading it."""
        return int(self._entry(name).n_elements)

    def field(self, key: str, default=None):
        """A GGUF metadata value (strings decoded, arrays as lists), or ``default``."""
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def drop_weight_pages(self) -> None:
        """Take the pages of the file read so far out of this process's resident set.

        The reader maps the whole file, and every page read while dequantizing stays resident
        (counted in RSS, up to the file's size) until the mapping is unmapped, which the
        metadata's views into it prevent. The mapping is read-only and file-backed, so
        MADV_DONTNEED loses nothing: a later read (the tokenizer's metadata) faults the page in
        again from the page cache. Linux only; elsewhere a no-op.
        """
        mapping = self.reader.data.base  # np.memmap's buffer: the mmap.mmap of the whole file
        if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def get(self, name: str) -> Weight:
        import gguf

        t = self._entry(name)
        qtype = t.tensor_type
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if qtype == gguf.GGMLQuantizationType.F32:
            w = Weight(np.asarray(t.data).reshape(shape), "f32")
        elif qtype == gguf.GGMLQuantizationType.F16:
            w = Weight(np.asarray(t.data).reshape(shape), "f16")
        elif qtype == gguf.GGMLQuantizationType.BF16:
            w = Weight(np.asarray(t.data).view(np.uint16).reshape(shape), "bf16")
        else:
            # Block scales are f16 in every supported quant type, so f16 holds the dequantized
            # values to within f16 rounding at half the memory of f32 (a 3.8B model: 7.6 GB, not 15).
            w = Weight(gguf.quants.dequantize(t.data, qtype).reshape(shape).astype(np.float16), "f16")
        if self.gguf_architecture == "llama":
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                w = Weight(unpermute_rows(w.array, self.config["num_attention_heads"]), w.dtype)
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                w = Weight(unpermute_rows(w.array, self.config["num_key_value_heads"]), w.dtype)
        return w


def _llama3_rope_scaling(freqs: np.ndarray, head_dim: int, theta: float) -> Optional[dict]:
    """Recover Llama 3.1's rope_scaling from llama.cpp's precomputed rope_freqs tensor.

    llama.cpp stores only the per-frequency divisors; the Hugging Face parameters are found by
    checking the ones every Llama 3.x release uses, and None is returned if they do not match.
    """
    factor = float(freqs.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    for low, high, original in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        expect = np.where(wavelen < high_wavelen, 1.0,
                          np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == freqs.shape and np.allclose(expect, freqs, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    return None


def _f32(v) -> float:
    """A GGUF float32 as the decimal Hugging Face wrote (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def _gguf_config(path: Path, fields: Callable[[str, object], object], arch: str,
                 tensors: Dict[str, object], raw: Dict[str, object]) -> dict:
    def key(k, default=None):
        return fields(f"{arch}.{k}", default)

    hf_arch, model_type = GGUF_ARCHITECTURES[arch]
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    layers = key("block_count")
    if not hidden or not heads or not layers:
        raise CheckpointError(f"{path} lacks {arch}.embedding_length/attention.head_count/block_count "
                              "metadata; use a GGUF written by a recent llama.cpp")
    if isinstance(heads, list):
        raise CheckpointError(f"{path} has per-layer head counts, which ovchat does not support")
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", hidden // heads)
    tokens = fields("tokenizer.ggml.tokens", None)
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and "model.embed_tokens.weight" in tensors:
        vocab = int(tensors["model.embed_tokens.weight"].shape[-1])
    theta = _f32(key("rope.freq_base", 10000.0))
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": int(hidden),
        "intermediate_size": int(key("feed_forward_length", 0)),
        "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": None,
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(vocab) if vocab else None,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "sliding_window": key("attention.sliding_window"),
        "torch_dtype": "float16",
    }
    if arch == "phi3" and not config["intermediate_size"] and "model.layers.0.mlp.gate_up_proj.weight" in tensors:
        config["intermediate_size"] = int(tensors["model.layers.0.mlp.gate_up_proj.weight"].shape[-1]) // 2
    rot = key("rope.dimension_count")
    if rot and int(rot) != config["head_dim"]:
        config["partial_rotary_factor"] = int(rot) / config["head_dim"]
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": _f32(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{path} uses rope scaling {scaling!r}, which ovchat does not support; "
                              "convert the Hugging Face checkpoint instead")
    if "rope_freqs.weight" in raw:
        freqs = np.asarray(raw["rope_freqs.weight"].data, dtype=np.float64)
        recovered = _llama3_rope_scaling(freqs, int(rot or head_dim), theta)
        if recovered is None:
            raise CheckpointError(f"{path} has a rope_freqs table that matches no known Llama 3 rope "
                                  "scaling; convert the Hugging Face checkpoint instead")
        config["rope_scaling"] = recovered
    if "rope_factors_long.weight" in raw:
        original = key("rope.scaling.original_context_length") or config["max_position_embeddings"]
        config["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(x) for x in np.asarray(raw["rope_factors_long.weight"].data)],
            "short_factor": [float(x) for x in np.asarray(raw["rope_factors_short.weight"].data)],
        }
        config["original_max_position_embeddings"] = int(original)
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        v = fields(f"tokenizer.ggml.{gguf_key}", None)
        if v is not None:
            config[hf_key] = int(v)
    return config


def gguf_eos_ids(fields: Callable[[str, object], object]) -> List[int]:
    """Every token id at which llama.cpp would stop: eos, end-of-turn and end-of-message."""
    ids: List[int] = []
    for k in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = fields(f"tokenizer.ggml.{k}", None)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def _open_gguf(path: Path) -> GGUFCheckpoint:
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, KeyError) as e:
        # gguf raises ValueError for a bad magic and numpy errors (a short read cannot be
        # reshaped) for a file cut short inside the metadata or tensor table.
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); re-download it") from None

    def fields(k, default=None):
        f = reader.fields.get(k)
        return default if f is None else f.contents()

    arch = fields("general.architecture", None)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} has GGUF architecture {arch!r}; ovchat converts {', '.join(sorted(GGUF_ARCHITECTURES))}")

    supported = {getattr(gguf.GGMLQuantizationType, t) for t in GGUF_TYPES}
    tensors: Dict[str, object] = {}
    raw: Dict[str, object] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte {end} but the file "
                                  f"has {size} bytes; re-download it")
        if t.tensor_type not in supported:
            raise CheckpointError(f"{path}: tensor {t.name} has quantization {t.tensor_type.name}; ovchat "
                                  f"reads {', '.join(GGUF_TYPES)} (use a GGUF in one of those)")
        if t.name in _GGUF_CONFIG_TENSORS:
            raw[t.name] = t
            continue
        hf = gguf_to_hf_name(t.name, arch)
        if hf is None:
            raise CheckpointError(f"{path}: tensor {t.name} has no Hugging Face counterpart in a {arch} "
                                  "model; this GGUF variant is not supported")
        tensors[hf] = t
    if "model.embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor; use a complete GGUF")

    config = _gguf_config(path, fields, arch, tensors, raw)
    generation_config = {"bos_token_id": config.get("bos_token_id"),
                         "eos_token_id": gguf_eos_ids(fields) or config.get("eos_token_id"),
                         "pad_token_id": config.get("pad_token_id")}
    generation_config = {k: v for k, v in generation_config.items() if v not in (None, [])}
    return GGUFCheckpoint(path, reader, arch, config, generation_config, tensors)


# ---------------------------------------------------------------------------------------------
# OpenVINO IR directories


class OVCheckpoint(Checkpoint):
    """An OpenVINO IR with float weights: only compressed (and given a tokenizer if it lacks one)."""

    kind = "ov"
    MODEL_XML = "openvino_model.xml"

    @property
    def xml(self) -> Path:
        return self.path / self.MODEL_XML

    def get(self, name: str) -> Weight:
        raise CheckpointError(f"{self.path} is an OpenVINO IR; its weights are not read by name")


def _open_ov(path: Path) -> OVCheckpoint:
    xml = path / OVCheckpoint.MODEL_XML
    binf = xml.with_suffix(".bin")
    if not binf.is_file():
        raise CheckpointError(f"{path} has {xml.name} but no {binf.name}; copy the complete IR")
    config = normalize_config(_read_json(path / "config.json")) if (path / "config.json").is_file() else {}
    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = _read_json(path / "generation_config.json")
    files = [xml, binf] + [path / f for f in ("config.json", "generation_config.json", *HF_EXTRA_FILES[:2],
                                               "openvino_tokenizer.xml", "openvino_tokenizer.bin",
                                               "openvino_detokenizer.xml", "openvino_detokenizer.bin")
                           if (path / f).is_file()]
    return OVCheckpoint(path, config, generation_config, sorted(set(files), key=files.index))


# ---------------------------------------------------------------------------------------------


def supported_architectures() -> Optional[Sequence[str]]:
    """The Hugging Face architectures ovchat.convert.models can build, or None if it cannot say."""
    try:
        from ovchat.convert import models
    except ImportError:
        return None
    archs = getattr(models, "ARCHITECTURES", None)
    return sorted(archs) if archs else None


def check_architecture(checkpoint: Checkpoint) -> None:
    """Fail before any heavy work when no builder exists for the checkpoint."""
    if checkpoint.kind == "ov":
        return
    supported = supported_architectures()
    arch = checkpoint.architecture
    if supported is None or arch in supported:
        return
    from ovchat.convert import models

    # A config without "architectures" is still buildable from its model_type.
    if not arch and checkpoint.config.get("model_type") in getattr(models, "MODEL_TYPES", {}):
        return
    found = arch or checkpoint.config.get("model_type") or "unknown (config.json names none)"
    raise UnsupportedArchitectureError(
        f"{checkpoint.path}: architecture {found} is not supported; ovchat converts {', '.join(supported)}")


def open_checkpoint(path) -> Checkpoint:
    """Open a Hugging Face directory, a .gguf file or an OpenVINO IR directory, by what is there."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a model directory or a .gguf file")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path} is not a GGUF file; give a .gguf file or a model directory")
        checkpoint: Checkpoint = _open_gguf(path)
    elif (path / OVCheckpoint.MODEL_XML).is_file():
        checkpoint = _open_ov(path)
    else:
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            checkpoint = _open_gguf(ggufs[0])
        else:
            checkpoint = _open_hf(path)
    check_architecture(checkpoint)
    log.info("opened %r", checkpoint)
    return checkpoint
