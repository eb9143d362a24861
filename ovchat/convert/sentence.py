"""How a sentence encoder turns its tokens' states into one vector: the pooling, whether the vector
is L2-normalized, and the longest input it reads (longer ones are truncated).

A Hugging Face directory in sentence-transformers' layout says so in its own files:
``modules.json`` (a Normalize module or not), ``1_Pooling/config.json`` (``pooling_mode_*``),
``sentence_bert_config.json`` (``max_seq_length``). A llama.cpp embedding GGUF says it in
``<arch>.pooling_type`` (1 mean, 2 CLS, 3 last token); llama.cpp normalizes embeddings by default.
A directory without those files gets mean pooling, normalized, the model's whole window: what
sentence-transformers itself assumes for a plain transformers checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ovchat.errors import CheckpointError

POOLINGS = ("mean", "cls", "last")
_ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean, cls or last
    normalize: bool
    max_length: Optional[int]  # tokens read at most, special tokens included

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def model_window(config: dict) -> Optional[int]:
    """The positions a model can read: MPNet and RoBERTa start counting after the padding id."""
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if positions and config.get("model_type") in ("mpnet", "roberta", "xlm-roberta"):
        return int(positions) - int(config.get("pad_token_id", 1)) - 1
    return int(positions) if positions else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); re-download the model") from None


def from_directory(path: Path, config: dict) -> Pooling:
    """A Hugging Face directory's pooling (sentence-transformers' files, else the defaults)."""
    window = model_window(config)
    modules = _json(path / "modules.json") if (path / "modules.json").is_file() else []
    if not isinstance(modules, list):
        raise CheckpointError(f"{path / 'modules.json'} is not a list of modules; re-download the model")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    mode = "mean"
    if "Pooling" in kinds:
        pooling_dir = path / str(kinds["Pooling"].get("path") or "1_Pooling")
        settings = _json(pooling_dir / "config.json") if (pooling_dir / "config.json").is_file() else {}
        chosen = [mode for key, mode in _ST_MODES.items() if settings.get(key)]
        unknown = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v and k not in _ST_MODES]
        if unknown or len(chosen) > 1:
            raise CheckpointError(f"{pooling_dir}: pooling {', '.join(unknown or [k for k in settings if settings[k] is True])} "
                                  f"is not supported; ovchat pools by {', '.join(POOLINGS)}, one at a time")
        mode = chosen[0] if chosen else "mean"
    length = window
    if (path / "sentence_bert_config.json").is_file():
        declared = _json(path / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            length = min(declared, window) if window else declared
    return Pooling(mode, normalize="Normalize" in kinds or not modules, max_length=length)


def from_gguf(field: Callable[[str, object], object], arch: str, config: dict) -> Pooling:
    """A llama.cpp embedding GGUF's pooling (``<arch>.pooling_type``)."""
    kind = field(f"{arch}.pooling_type", 1)
    if kind not in _GGUF_POOLING:
        raise CheckpointError(f"{arch}.pooling_type {kind!r} is not supported; ovchat pools by mean (1), CLS (2) "
                              "or last token (3)")
    return Pooling(_GGUF_POOLING[kind], normalize=True, max_length=model_window(config))
