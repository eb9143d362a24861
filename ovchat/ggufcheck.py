"""A GGUF file checked completely before native code reads it.

GenAI's GGUF reader (and llama.cpp's) trusts the file: a tensor count of 2**62, a data offset past
the end, a head count of 0 or a token id past the vocabulary crash the process (SIGSEGV, SIGFPE)
or end in a C++ exception without a message. A model file comes from the internet, so ovchat reads
the whole header with its own reader first (``gguffile``: bounded, standard library) and checks
what a native reader relies on:

- the container: every tensor's name, dimension count, dimensions and type; its bytes inside
  the file (a truncated download is refused, not run on garbage); the alignment;
- for GenAI's own reader (``for_genai``): an architecture and tensor types it reads, the
  hyperparameters those architectures need (positive, within reason, consistent with each other),
  the vocabulary and the special token ids, and every tensor the graph takes, with the shape the
  hyperparameters give it.

``check_gguf`` raises ModelLoadError with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from ovchat.errors import ModelLoadError

# ggml's tensor types: id -> (name, elements per block, bytes per block), as ggml's type traits
# and gguf-py's GGML_QUANT_SIZES give them (tests/test_hostile_gguf.py checks the two agree).
GGML_TYPES: Dict[int, Tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# What GenAI's GGUF reader builds and dequantizes (openvino.genai src/cpp/src/gguf_utils).
GENAI_ARCHITECTURES = ("llama", "qwen2", "qwen3")
GENAI_TYPES = (0, 1, 2, 3, 8, 12, 14, 30)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME = 63  # ggml's GGML_MAX_NAME (64) less the terminating NUL
MAX_ELEMENTS = 1 << 40  # one tensor; the largest models' embeddings are ~2**30
# Upper bounds far beyond any real model, so a lie is caught before it sizes an allocation.
_LIMITS = {"block_count": 1024, "embedding_length": 1 << 17, "feed_forward_length": 1 << 20,
           "attention.head_count": 1024, "attention.head_count_kv": 1024, "attention.key_length": 4096,
           "attention.value_length": 4096, "context_length": 1 << 24, "rope.dimension_count": 4096}
_SPECIAL_IDS = ("bos", "eos", "unknown", "padding", "seperator", "separator", "eot", "eom")
_BLOCK = re.compile(r"blk\.(\d+)\.")


class _Bad(Exception):
    """One defect, said as the middle of the error line."""


def check_gguf(path: Path, *, for_genai: bool = True) -> None:
    """Raise ModelLoadError unless ``path`` is a GGUF whose every header field a native reader
    relies on is sound (and, ``for_genai``, one that GenAI's reader can build)."""
    from ovchat.gguffile import FormatError, GGUFFile

    path = Path(path)
    try:
        gguf = GGUFFile(path)
    except FormatError as e:
        raise ModelLoadError(f"{e}; download it again") from None
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read ({e.strerror})") from None
    try:
        _check_container(gguf)
        if for_genai:
            _check_for_genai(gguf)
    except _Bad as e:
        raise ModelLoadError(f"{path} is not a usable GGUF model: {e}") from None
    finally:
        gguf.close()


def container_problem(gguf: Any) -> Optional[str]:
    """What is wrong with an open GGUFFile as a container (None: nothing), for readers of any
    architecture (the converter)."""
    try:
        _check_container(gguf)
    except _Bad as e:
        return str(e)
    return None


def tensor_bytes(type_id: int, dims: Tuple[int, ...]) -> int:
    _, block, size = GGML_TYPES[type_id]
    n = 1
    for d in dims:
        n *= d
    return n // block * size


def _check_container(gguf: Any) -> None:
    alignment = gguf.fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise _Bad(f"general.alignment is {alignment!r}, not a power of two")
    seen = set()
    for t in gguf.tensors:
        if not t.name or len(t.name.encode()) > MAX_NAME:
            raise _Bad(f"a tensor name is {len(t.name.encode())} bytes (at most {MAX_NAME})")
        if t.name in seen:
            raise _Bad(f"tensor {t.name} appears twice")
        seen.add(t.name)
        if not 1 <= len(t.dims) <= MAX_DIMS or any(d < 1 for d in t.dims) or t.n_elements > MAX_ELEMENTS:
            raise _Bad(f"tensor {t.name} has dimensions {list(t.dims)}")
        if t.type_id not in GGML_TYPES:
            raise _Bad(f"tensor {t.name} has type {t.type_id}, which is no ggml type")
        name, block, _ = GGML_TYPES[t.type_id]
        if t.dims[0] % block:
            raise _Bad(f"tensor {t.name} ({name}) has rows of {t.dims[0]} values, not whole blocks of {block}")
        if t.offset % alignment:
            raise _Bad(f"tensor {t.name}'s data is not aligned to {alignment} bytes")
        end = t.offset + tensor_bytes(t.type_id, t.dims)
        if end > gguf.size:
            raise _Bad(f"tensor {t.name} ends at byte {end:,}, past the end of the file ({gguf.size:,} bytes): "
                       "the file is truncated or damaged; download it again")
    if not gguf.tensors:
        raise _Bad("it holds no tensors")


def _check_for_genai(gguf: Any) -> None:
    arch = gguf.fields.get("general.architecture")
    if arch not in GENAI_ARCHITECTURES:
        raise _Bad(f"architecture {arch!r} is not one OpenVINO GenAI runs from a GGUF ({', '.join(GENAI_ARCHITECTURES)}); "
                   "convert it first: ovchat convert FILE OUTPUT (needs the convert extra)")
    for t in gguf.tensors:
        if t.type_id not in GENAI_TYPES:
            raise _Bad(f"tensor {t.name} is {GGML_TYPES[t.type_id][0]}, which OpenVINO GenAI does not read from a "
                       "GGUF; convert it first: ovchat convert FILE OUTPUT (needs the convert extra)")
    hp = _hyperparameters(gguf.fields, arch)
    n_vocab = _check_vocabulary(gguf.fields)
    shapes = dict(_expected_shapes(arch, hp, gguf))
    tensors = {t.name: t for t in gguf.tensors}
    for name, shape in shapes.items():
        if name not in tensors:
            if name.endswith(".bias") or name == "output.weight":  # optional: no bias, tied embeddings
                continue
            raise _Bad(f"tensor {name} is missing")
        if tensors[name].dims != shape:
            raise _Bad(f"tensor {name} has shape {list(tensors[name].dims)}; the metadata says {list(shape)}")
    for name in tensors:
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= hp["block_count"]:
            raise _Bad(f"it holds tensors of block {m.group(1)} but {arch}.block_count is {hp['block_count']}")
    rows = tensors["token_embd.weight"].dims[1]
    if n_vocab > rows:
        raise _Bad(f"the vocabulary has {n_vocab} tokens but token_embd.weight only {rows} rows")


def _hyperparameters(fields: Dict[str, Any], arch: str) -> Dict[str, int]:
    hp: Dict[str, int] = {}
    for key, limit in _LIMITS.items():
        value = fields.get(f"{arch}.{key}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise _Bad(f"{arch}.{key} is {value!r} (a whole number from 1 to {limit} is needed)")
        hp[key] = value
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if key not in hp:
            raise _Bad(f"{arch}.{key} is missing")
    heads = hp["attention.head_count"]
    kv = hp.setdefault("attention.head_count_kv", heads)
    if heads % kv:
        raise _Bad(f"{arch}.attention.head_count ({heads}) is not a multiple of head_count_kv ({kv})")
    if "attention.key_length" not in hp and hp["embedding_length"] % heads:
        raise _Bad(f"{arch}.embedding_length ({hp['embedding_length']}) is not a multiple of the head count ({heads})")
    hp["head_dim"] = hp.get("attention.key_length") or hp["embedding_length"] // heads
    if hp.get("rope.dimension_count", 0) > hp["head_dim"]:
        raise _Bad(f"{arch}.rope.dimension_count ({hp['rope.dimension_count']}) is larger than a head ({hp['head_dim']})")
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        value = fields.get(f"{arch}.{key}")
        if value is not None and (not isinstance(value, (int, float)) or not 0 < value < float("inf")):
            raise _Bad(f"{arch}.{key} is {value!r} (a positive number is needed)")
    return hp


def _check_vocabulary(fields: Dict[str, Any]) -> int:
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise _Bad("it has no vocabulary (tokenizer.ggml.tokens)")
    n = len(tokens)
    model = fields.get("tokenizer.ggml.model")
    if not isinstance(model, str):
        raise _Bad("tokenizer.ggml.model is missing")
    if model == "gpt2" and not isinstance(fields.get("tokenizer.ggml.merges"), list):
        raise _Bad("its BPE vocabulary has no merges (tokenizer.ggml.merges)")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        value = fields.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            raise _Bad(f"{key} has {len(value) if isinstance(value, list) else 'no'} entries for {n} tokens")
    for name in _SPECIAL_IDS:
        value = fields.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n):
            raise _Bad(f"tokenizer.ggml.{name}_token_id is {value!r}, outside the vocabulary of {n} tokens")
    return n


def _expected_shapes(arch: str, hp: Dict[str, int], gguf: Any) -> Iterator[Tuple[str, Tuple[int, ...]]]:
    """(name, dims in GGUF order) of every tensor the graph takes; biases and the separate output
    matrix may be absent (tied embeddings)."""
    emb, ff, hd = hp["embedding_length"], hp["feed_forward_length"], hp["head_dim"]
    q, kv = hp["attention.head_count"] * hd, hp["attention.head_count_kv"] * hd
    rows = next((t.dims[1] for t in gguf.tensors if t.name == "token_embd.weight" and len(t.dims) == 2), None)
    if rows is None:
        raise _Bad("tensor token_embd.weight is missing or not a matrix")
    yield "token_embd.weight", (emb, rows)
    yield "output_norm.weight", (emb,)
    yield "output.weight", (emb, rows)
    for i in range(hp["block_count"]):
        b = f"blk.{i}."
        yield from ((b + "attn_norm.weight", (emb,)), (b + "attn_q.weight", (emb, q)), (b + "attn_k.weight", (emb, kv)),
                    (b + "attn_v.weight", (emb, kv)), (b + "attn_output.weight", (q, emb)),
                    (b + "ffn_norm.weight", (emb,)), (b + "ffn_gate.weight", (emb, ff)),
                    (b + "ffn_up.weight", (emb, ff)), (b + "ffn_down.weight", (ff, emb)),
                    (b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,)))
        if arch == "qwen3":
            yield b + "attn_q_norm.weight", (hd,)
            yield b + "attn_k_norm.weight", (hd,)
