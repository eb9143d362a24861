"""Hugging Face model directories: config.json and one or sharded *.safetensors, memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ovchat.convert import safetensors
from ovchat.convert.checkpoint import HF_EXTRA_FILES, Checkpoint, read_json
from ovchat.convert.tensors import Weight
from ovchat.errors import CheckpointError


class HFCheckpoint(Checkpoint):
    kind = "hf"

    def __init__(self, path: Path, config: dict, generation_config: Optional[dict], files: List[Path],
                 owner: Dict[str, Path]):
        super().__init__(path, config, generation_config, files, owner)  # name -> its .safetensors
        self._loaded: Dict[Path, Dict[str, Weight]] = {}
        self._headers: Dict[Path, dict] = {}

    def get(self, name: str) -> Weight:
        file = self._entry(name)
        if file not in self._loaded:
            self._loaded[file] = safetensors.load(file)
        return self._loaded[file][name]

    def shape(self, name: str) -> Tuple[int, ...]:
        file = self._entry(name)
        if file not in self._headers:
            self._headers[file] = safetensors.read_header(file)[0]
        return tuple(self._headers[file][name]["shape"])

    def parameter_count(self) -> int:
        total = 0
        for file in sorted(set(self._index.values())):
            header, _ = safetensors.read_header(file)
            for name, info in header.items():
                if name != "__metadata__":
                    count = 1
                    for d in info["shape"]:
                        count *= d
                    total += count
        return total


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


def open_hf(path: Path) -> HFCheckpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; download the complete model directory")
    config = normalize_config(read_json(config_path))

    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path)
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
        generation_config = read_json(path / "generation_config.json")
    files = [config_path] + ([index_path] if index_path.is_file() else []) + list(shards)
    files += [path / f for f in HF_EXTRA_FILES if (path / f).is_file()]
    return HFCheckpoint(path, config, generation_config, files, owner)
