"""Hugging Face checkpoints whose config.json or safetensors header lies are refused in one line
before anything is built: each case is a sound tiny random llama (written here) with one lie in
it, the lies a probe found ending in tracebacks (ZeroDivisionError, numpy reshape errors), or
converted silently into a wrong model (a layer fewer, a larger vocabulary)."""

from __future__ import annotations

import json
import struct

import pytest

from convert_helpers import write_checkpoint
from test_robustness import ovchat, one_line_error


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", seed=5)


def _copy(source, tmp_path):
    import shutil

    target = tmp_path / "lying"
    shutil.copytree(source, target)
    return target


def _nest(depth: int) -> str:
    return '{"architectures": ["LlamaForCausalLM"], "x": ' + "[" * depth + "]" * depth + "}"


# name -> (change to config.json, a word the refusal must contain)
CONFIG_LIES = {
    "hidden_size not the weights'": ({"hidden_size": 48}, "shape"),
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads"),
    "a string where a number belongs": ({"intermediate_size": "64"}, "intermediate_size"),
    "rope_scaling factor 'x'": ({"rope_scaling": {"rope_type": "linear", "factor": "x"}}, "rope_scaling.factor"),
    "one layer fewer than the weights": ({"num_hidden_layers": 1}, "num_hidden_layers"),
    "one layer more than the weights": ({"num_hidden_layers": 3}, "num_hidden_layers"),
    "a vocabulary larger than the embedding": ({"vocab_size": 100000}, "vocab_size"),
    "heads not a multiple of kv heads": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "a billion layers": ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers"),
}


def test_the_sound_checkpoint_passes(source):
    from ovchat.convert.sources import open_checkpoint
    from ovchat.convert.validate import check

    check(open_checkpoint(source))


@pytest.mark.parametrize("case", list(CONFIG_LIES))
def test_a_config_that_lies_is_refused_before_building(source, tmp_path, case):
    from ovchat.convert import convert
    from ovchat.errors import CheckpointError

    change, word = CONFIG_LIES[case]
    lying = _copy(source, tmp_path)
    config = json.loads((lying / "config.json").read_text())
    config.update(change)
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as refused:
        convert(lying, tmp_path / "out", receipt=False)
    assert word in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert not (tmp_path / "out").exists()


def _rewrite_header(path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n:])


def _first(header) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


HEADER_LIES = {
    "data offsets [100, 50]": (lambda h: _first(h).update(data_offsets=[100, 50]), "data offsets"),
    "a shape of 10**6 x 10**6": (lambda h: _first(h).update(shape=[10 ** 6, 10 ** 6]), "shape"),
    "a shape of strings": (lambda h: _first(h).update(shape=["a"]), "shape"),
    "no description": (lambda h: h.update({next(k for k in h if k != "__metadata__"): 5}), "description"),
    "a header with no tensors": (lambda h: (h.clear(), h.update({"__metadata__": {}})), None),
}


@pytest.mark.parametrize("case", list(HEADER_LIES))
def test_a_safetensors_header_that_lies_is_refused(source, tmp_path, case):
    from ovchat.convert import convert
    from ovchat.errors import CheckpointError

    edit, word = HEADER_LIES[case]
    lying = _copy(source, tmp_path)
    weights = next(lying.glob("*.safetensors"))
    _rewrite_header(weights, edit)
    with pytest.raises(CheckpointError) as refused:
        convert(lying, tmp_path / "out", receipt=False)
    assert word is None or word in str(refused.value), str(refused.value)


def test_a_config_nested_100000_deep_and_a_header_nested_deep(source, tmp_path):
    from ovchat.convert import convert
    from ovchat.errors import CheckpointError

    lying = _copy(source, tmp_path)
    (lying / "config.json").write_text(_nest(100_000))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        convert(lying, tmp_path / "out", receipt=False)


def test_the_cli_says_it_in_one_line(source, tmp_path):
    lying = _copy(source, tmp_path)
    config = json.loads((lying / "config.json").read_text())
    config["num_attention_heads"] = 0
    (lying / "config.json").write_text(json.dumps(config))
    one_line_error(ovchat("convert", str(lying), str(tmp_path / "out")), "num_attention_heads is 0")
    assert not (tmp_path / "out").exists()
