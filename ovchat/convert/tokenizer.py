"""Tokenizer conversion: tokenizer.json or GGUF metadata -> openvino_tokenizer/detokenizer IRs.

openvino_tokenizers converts only transformers tokenizer objects, so both sources become a
``PreTrainedTokenizerFast``: a Hugging Face directory directly, a GGUF file through an equivalent
tokenizer.json built in memory from its ``tokenizer.ggml.*`` metadata (transformers' own GGUF
tokenizer conversion was seen to break SmolLM2, so ovchat does not use it). transformers is
imported only inside these functions: it is heavy, and nothing else in ovchat needs it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from ovchat.convert.checkpoint import Checkpoint
from ovchat.convert.gguf import GGUFCheckpoint, gguf_eos_ids
from ovchat.errors import CheckpointError, ConversionError
from ovchat.modelfiles import TOKENIZER_FILES
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)


# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits of llama.cpp's tokenizer.ggml.pre types, as Hugging Face writes them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = dict(_BYTE_LEVEL, use_regex=False)
_DIGITS = {"type": "Digits", "individual_digits": True}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_BPE_PRE_TOKENIZERS: Dict[str, dict] = {
    "gpt-2": _BYTE_LEVEL,
    "default": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [_DIGITS, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _BYTE_LEVEL_NO_REGEX]},
    "llama3": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _BYTE_LEVEL_NO_REGEX]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_SPLIT), _BYTE_LEVEL_NO_REGEX]},
}


def has_tokenizer(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint carries what convert_tokenizer needs."""
    if checkpoint.kind == "gguf":
        return checkpoint.field("tokenizer.ggml.tokens") is not None
    return (checkpoint.path / "tokenizer.json").is_file()


def convert_tokenizer(checkpoint: Checkpoint, output_dir, *, progress: ProgressCallback = ignore) -> Dict[str, object]:
    """Write openvino_tokenizer/detokenizer IRs and generation_config.json into ``output_dir``.

    Returns the special ids written into the tokenizer's rt_info (bos/eos/pad, all eos ids).
    """
    output_dir = Path(output_dir)
    progress(Progress("tokenizer", "converting the tokenizer"))
    with tempfile.TemporaryDirectory(prefix="ovchat-tok-") as tmp:
        if checkpoint.kind == "gguf":
            source = Path(tmp)
            write_gguf_tokenizer_files(checkpoint, source)
        else:
            source = checkpoint.path
            if not (source / "tokenizer.json").is_file():
                raise CheckpointError(f"{source} has no tokenizer.json; copy the model's tokenizer files "
                                      "(tokenizer.json, tokenizer_config.json) into it")
        hf_tokenizer = _load_hf_tokenizer(source)
    specials = _special_ids(checkpoint, hf_tokenizer)
    tok, detok = _to_openvino(hf_tokenizer)
    for model in (tok, detok):
        _set_rt_info(model, hf_tokenizer, specials)

    import openvino as ov

    output_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(tok, output_dir / TOKENIZER_FILES[0])
    ov.save_model(detok, output_dir / TOKENIZER_FILES[2])
    write_generation_config(checkpoint, output_dir, specials)
    log.info("tokenizer written to %s: %s", output_dir, specials)
    return specials


# ---------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizer.json


def gguf_tokenizer_json(checkpoint: GGUFCheckpoint) -> dict:
    """The Hugging Face tokenizer.json equivalent of a GGUF file's tokenizer metadata."""
    f = checkpoint.field
    model = f("tokenizer.ggml.model")
    tokens: Optional[List[str]] = f("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError(f"{checkpoint.path} has no tokenizer.ggml.tokens metadata; "
                              "use a GGUF that embeds its tokenizer")
    types = f("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if model == "gpt2":
        spec = _gpt2_tokenizer_json(checkpoint, tokens)
    elif model == "llama":
        spec = _spm_tokenizer_json(checkpoint, tokens, types)
    elif model == "bert":
        return _wordpiece_tokenizer_json(checkpoint, tokens, types)
    else:
        raise CheckpointError(f"{checkpoint.path} has tokenizer model {model!r}; ovchat converts GGUF "
                              "tokenizers of type gpt2 (byte-level BPE), llama (SentencePiece) and bert (WordPiece)")
    byte_tokens = model == "llama"
    spec["added_tokens"] = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": ty == _CONTROL}
        for i, (tok, ty) in enumerate(zip(tokens, types))
        if ty in (_CONTROL, _USER_DEFINED) or (ty == _UNKNOWN and byte_tokens)
    ]
    spec["post_processor"] = _post_processor(checkpoint, tokens)
    return spec


def _wordpiece_tokenizer_json(checkpoint: GGUFCheckpoint, tokens: List[str], types: List[int]) -> dict:
    """BERT's WordPiece tokenizer (uncased, as llama.cpp's WPM tokenizer is): llama.cpp stores its
    vocabulary in "phantom space" form (a word-initial piece gets a leading U+2581, a
    continuation loses its "##"), which is undone here; [CLS] text [SEP] around every input."""
    f = checkpoint.field
    vocab: Dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == _CONTROL or (tok.startswith("[") and tok.endswith("]")):
            piece = tok
        elif tok.startswith("\u2581"):
            piece = tok[1:]
        else:
            piece = "##" + tok
        vocab.setdefault(piece, i)

    def token(*keys: str) -> Optional[int]:
        return next((int(f(f"tokenizer.ggml.{k}")) for k in keys if f(f"tokenizer.ggml.{k}") is not None), None)

    cls, sep, unk = token("cls_token_id", "bos_token_id"), token("seperator_token_id", "eos_token_id"), \
        token("unknown_token_id")
    if cls is None or sep is None:
        raise CheckpointError(f"{checkpoint.path} names no [CLS]/[SEP] tokens (tokenizer.ggml.cls_token_id, "
                              "seperator_token_id); use a GGUF written by a recent llama.cpp")
    specials = {tokens[cls]: {"id": tokens[cls], "ids": [cls], "tokens": [tokens[cls]]},
                tokens[sep]: {"id": tokens[sep], "ids": [sep], "tokens": [tokens[sep]]}}
    single = [{"SpecialToken": {"id": tokens[cls], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"SpecialToken": {"id": tokens[sep], "type_id": 0}}]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing", "single": single,
                           "pair": single + [{"Sequence": {"id": "B", "type_id": 1}},
                                             {"SpecialToken": {"id": tokens[sep], "type_id": 1}}],
                           "special_tokens": specials},
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": tokens[unk] if unk is not None else "[UNK]",
                  "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab},
    }


def _gpt2_tokenizer_json(checkpoint: GGUFCheckpoint, tokens: List[str]) -> dict:
    pre = checkpoint.field("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE_TOKENIZERS:
        raise CheckpointError(
            f"{checkpoint.path} has pre-tokenizer {pre!r}, which ovchat cannot rebuild (it knows "
            f"{', '.join(sorted(_BPE_PRE_TOKENIZERS))}); put the model's tokenizer.json beside the GGUF")
    merges = checkpoint.field("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(f"{checkpoint.path} has a BPE tokenizer without tokenizer.ggml.merges; "
                              "use a GGUF that embeds its tokenizer")
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": _BPE_PRE_TOKENIZERS[pre],
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in ("llama-bpe", "llama3"),
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def _spm_tokenizer_json(checkpoint: GGUFCheckpoint, tokens: List[str], types: List[int]) -> dict:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, Phi-3) as a byte-fallback BPE model.

    GGUF keeps only pieces and scores; the merges SentencePiece implies are every split of a
    piece into two pieces of the vocabulary, ranked by the merged piece's score.
    """
    scores = checkpoint.field("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        if types[i] != _NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((scores[i], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = checkpoint.field("tokenizer.ggml.unknown_token_id")
    add_prefix = checkpoint.field("tokenizer.ggml.add_space_prefix", True)
    normalizers = ([{"type": "Prepend", "prepend": "\u2581"}] if add_prefix else [])
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"})
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None,
                  "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": [[m[3], m[4]] for m in merges]},
    }


def _post_processor(checkpoint: GGUFCheckpoint, tokens: List[str]) -> Optional[dict]:
    f = checkpoint.field
    add_bos = f("tokenizer.ggml.add_bos_token", f("tokenizer.ggml.model") == "llama")
    add_eos = f("tokenizer.ggml.add_eos_token", False)
    bos, eos = f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")
    single: list = []
    specials: dict = {}
    if add_bos and bos is not None:
        single.append({"SpecialToken": {"id": tokens[bos], "type_id": 0}})
        specials[tokens[bos]] = {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if add_eos and eos is not None:
        single.append({"SpecialToken": {"id": tokens[eos], "type_id": 0}})
        specials[tokens[eos]] = {"id": tokens[eos], "ids": [eos], "tokens": [tokens[eos]]}
    if not specials:
        if f("tokenizer.ggml.model") == "gpt2":
            return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
        return None
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def write_gguf_tokenizer_files(checkpoint: GGUFCheckpoint, directory: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json equivalent to the GGUF's tokenizer."""
    spec = gguf_tokenizer_json(checkpoint)
    tokens = checkpoint.field("tokenizer.ggml.tokens")
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                    "model_max_length": checkpoint.config.get("max_position_embeddings", 4096)}
    for gguf_key, hf_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                             ("padding_token_id", "pad_token"), ("unknown_token_id", "unk_token")):
        i = checkpoint.field(f"tokenizer.ggml.{gguf_key}")
        if i is not None and 0 <= int(i) < len(tokens):
            config[hf_key] = tokens[int(i)]
    template = checkpoint.field("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------


def _load_hf_tokenizer(directory: Path):
    # transformers announces at import that PyTorch is absent; that is the point, so hush it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = directory / "tokenizer.json"
    try:
        json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{tokenizer_json} is unreadable ({e}); re-download it") from None
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{directory}: the tokenizer cannot be read ({e}); "
                              "re-download tokenizer.json and tokenizer_config.json") from None


def _to_openvino(hf_tokenizer):
    from openvino_tokenizers import convert_tokenizer as ov_convert

    try:
        return ov_convert(hf_tokenizer, with_detokenizer=True)
    except (NotImplementedError, OSError, ValueError) as e:
        raise ConversionError(f"openvino_tokenizers cannot convert this tokenizer ({e}); "
                              "report it with the model name") from None


def _special_ids(checkpoint: Checkpoint, hf_tokenizer) -> Dict[str, object]:
    """bos/eos/pad ids and every id that ends generation, from the most specific source."""
    gen = checkpoint.generation_config or {}
    config = checkpoint.config or {}

    def pick(key):
        for source in (gen, config):
            v = source.get(key)
            if v is not None:
                return v
        return getattr(hf_tokenizer, key, None)

    eos_ids: List[int] = []
    for v in (gen.get("eos_token_id"), config.get("eos_token_id"), hf_tokenizer.eos_token_id):
        for i in (v if isinstance(v, list) else [v]):
            if i is not None and int(i) not in eos_ids:
                eos_ids.append(int(i))
    if checkpoint.kind == "gguf":
        for i in gguf_eos_ids(checkpoint.field):
            if i not in eos_ids:
                eos_ids.append(i)
    bos = pick("bos_token_id")
    pad = pick("pad_token_id")
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return {"bos_token_id": None if bos is None else int(bos),
            "eos_token_id": eos_ids[0] if eos_ids else None,
            "eos_token_ids": eos_ids,
            "pad_token_id": None if pad is None else int(pad)}


def _set_rt_info(model, hf_tokenizer, specials: Dict[str, object]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if specials[key] is not None:
            model.set_rt_info(str(specials[key]), key)
    template = getattr(hf_tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: GenAI takes the default one
        template = template.get("default") or next(iter(template.values()))
    if template:
        model.set_rt_info(template, "chat_template")


def write_generation_config(checkpoint: Checkpoint, output_dir: Path, specials: Dict[str, object]) -> None:
    """generation_config.json with the source's settings and every eos id, so generation stops."""
    gen = dict(checkpoint.generation_config or {})
    eos = specials["eos_token_ids"]
    if eos:
        gen["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    for key in ("bos_token_id", "pad_token_id"):
        if specials[key] is not None:
            gen.setdefault(key, specials[key])
    (output_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
