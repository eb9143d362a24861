"""Crafted GGUF files never reach native code: each is the real demo GGUF with one field made a
lie (the cases that crashed `ovchat run -m file.gguf` with SIGSEGV, SIGFPE or a C++ exception, or
ran a truncated file on garbage), refused in one line by `ovchat.ggufcheck` before GenAI sees
it. The field offsets are found by this file's own GGUF parser, not by ovchat's reader."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest

from convert_helpers import demo_gguf  # noqa: F401
from test_robustness import one_line_error

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(b: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
    item, count = struct.unpack_from("<IQ", b, pos)
    pos += 12
    if item in _SCALAR_SIZES:
        return pos + count * _SCALAR_SIZES[item]
    for _ in range(count):
        pos = _skip_value(b, pos, item)
    return pos


def layout(b: bytes):
    """Where each key's value and each tensor description's fields sit in the file."""
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    pos, keys, tensors = 24, {}, {}
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", b, pos)
        key = b[pos + 8:pos + 8 + n].decode()
        (vtype,) = struct.unpack_from("<I", b, pos + 8 + n)
        keys[key] = (vtype, pos + 12 + n, pos)  # type, value offset, key-length offset
        pos = _skip_value(b, pos + 12 + n, vtype)
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", b, pos)
        name = b[pos + 8:pos + 8 + n].decode()
        at = {"name_length": pos, "name": pos + 8}
        pos += 8 + n
        (n_dims,) = struct.unpack_from("<I", b, pos)
        at.update(n_dims=pos, dims=pos + 4, type=pos + 4 + 8 * n_dims, offset=pos + 8 + 8 * n_dims)
        tensors[name] = at
        pos += 4 + 8 * n_dims + 12
    return keys, tensors


@pytest.fixture(scope="module")
def original(demo_gguf):  # noqa: F811
    data = demo_gguf.read_bytes()
    return data, layout(data)


def _put(data: bytearray, at: int, fmt: str, value) -> None:
    struct.pack_into(fmt, data, at, value)


def _rename(data: bytearray, at: int, old: str, new: str) -> None:
    assert len(old) == len(new) and data[at:at + len(old)] == old.encode()
    data[at:at + len(new)] = new.encode()


# name -> (what to do to the bytes, a word the one-line refusal must contain)
def _cases(keys, tensors):
    first = next(iter(tensors))
    q = tensors["blk.0.attn_q.weight"]
    return {
        "tensor count 2**62": (lambda d: _put(d, 8, "<Q", 2 ** 62), "corrupt"),
        "key count 2**60": (lambda d: _put(d, 16, "<Q", 2 ** 60), "corrupt"),
        "tensor data offset 2**40": (lambda d: _put(d, tensors[first]["offset"], "<Q", 2 ** 40), "past the end"),
        "tensor name length 2**50": (lambda d: _put(d, tensors[first]["name_length"], "<Q", 2 ** 50), "corrupt"),
        "n_dims 2**31": (lambda d: _put(d, tensors[first]["n_dims"], "<I", 2 ** 31), "corrupt"),
        "a dimension of 0": (lambda d: _put(d, q["dims"], "<Q", 0), "dimensions"),
        "a dimension of 2**40": (lambda d: _put(d, q["dims"] + 8, "<Q", 2 ** 40), "dimensions"),
        "bos id 10**9": (lambda d: _put(d, keys["tokenizer.ggml.bos_token_id"][1], "<I", 10 ** 9), "bos_token_id"),
        "eos id 10**9": (lambda d: _put(d, keys["tokenizer.ggml.eos_token_id"][1], "<I", 10 ** 9), "eos_token_id"),
        "head count 0": (lambda d: _put(d, keys["llama.attention.head_count"][1], "<I", 0), "head_count"),
        "kv head count 7": (lambda d: _put(d, keys["llama.attention.head_count_kv"][1], "<I", 7), "head_count"),
        "block count 10**6": (lambda d: _put(d, keys["llama.block_count"][1], "<I", 10 ** 6), "block_count"),
        "block count one more": (lambda d: _put(d, keys["llama.block_count"][1], "<I", 31), "missing"),
        "block count one less": (lambda d: _put(d, keys["llama.block_count"][1], "<I", 29), "block 29"),
        "embedding length one head wider": (lambda d: _put(d, keys["llama.embedding_length"][1], "<I", 648), "shape"),
        "tensor type 999": (lambda d: _put(d, q["type"], "<I", 999), "no ggml type"),
        "tensor type 42": (lambda d: _put(d, q["type"], "<I", 42), "no ggml type"),
        "a type GenAI does not read": (lambda d: _put(d, q["type"], "<I", 6), "convert it first"),
        "unknown architecture": (lambda d: _rename(d, keys["general.architecture"][1] + 8, "llama", "llamb"),
                                 "convert it first"),
        "no tokens": (lambda d: _rename(d, keys["tokenizer.ggml.tokens"][2] + 8, "tokenizer.ggml.tokens",
                                        "tokenizer.ggml.tokenz"), "vocabulary"),
        "a missing tensor": (lambda d: _rename(d, q["name"], "blk.0.attn_q.weight", "blk.0.attn_x.weight"),
                             "blk.0.attn_q.weight is missing"),
    }


def test_the_real_demo_passes(demo_gguf):  # noqa: F811
    from ovchat.ggufcheck import check_gguf

    check_gguf(demo_gguf)


def test_every_crafted_gguf_is_refused_before_genai_reads_it(original, tmp_path):
    from ovchat.errors import ModelLoadError
    from ovchat.ggufcheck import check_gguf

    data, (keys, tensors) = original
    for name, case in _cases(keys, tensors).items():
        edit, word = case
        crafted = bytearray(data)
        edit(crafted)
        path = tmp_path / "crafted.gguf"
        path.write_bytes(crafted)
        start = time.monotonic()
        with pytest.raises(ModelLoadError) as refused:
            check_gguf(path)
        message = str(refused.value)
        assert word in message and "\n" not in message, (name, message)
        assert time.monotonic() - start < 10, name
    # Truncated anywhere in the tensor data: the last tensor no longer fits.
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match="truncated"):
        check_gguf(path)
    path.write_bytes(data[:1000])  # inside the metadata
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        check_gguf(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tensor count 2**62", "tensor data offset 2**40", "tensor name length 2**50",
                                  "n_dims 2**31", "bos id 10**9", "head count 0", "tensor type 42",
                                  "unknown architecture", "a missing tensor", "embedding length one head wider"])
def test_ovchat_run_refuses_a_crafted_gguf_in_one_line(original, tmp_path, case):
    """Each of these crashed the process (SIGSEGV, SIGFPE) or was a C++ exception's traceback."""
    data, (keys, tensors) = original
    edit, word = _cases(keys, tensors)[case]
    crafted = bytearray(data)
    edit(crafted)
    path = tmp_path / "model.gguf"
    path.write_bytes(crafted)
    done = subprocess.run([sys.executable, "-m", "ovchat.cli", "run", "-m", str(path), "--no-server", "Hi"],
                          capture_output=True, timeout=120)
    one_line_error(done, word)


@pytest.mark.slow
def test_ovchat_run_refuses_a_truncated_gguf(original, tmp_path):
    """A truncated download ran with exit status 0 and printed garbage."""
    data, _ = original
    path = tmp_path / "model.gguf"
    path.write_bytes(data[: len(data) - 4096])
    done = subprocess.run([sys.executable, "-m", "ovchat.cli", "run", "-m", str(path), "--no-server", "Hi"],
                          capture_output=True, timeout=120)
    one_line_error(done, "truncated")


def test_convert_checks_the_container_too(original, tmp_path):
    """The converter reads every architecture and type, so it checks the container alone."""
    from ovchat.convert.checkpoint import CheckpointError
    from ovchat.convert.gguf import open_gguf

    data, (keys, tensors) = original
    crafted = bytearray(data)
    _put(crafted, tensors["blk.0.attn_q.weight"]["offset"], "<Q", 2 ** 40)
    path = tmp_path / "crafted.gguf"
    path.write_bytes(crafted)
    with pytest.raises(CheckpointError, match="past the end"):
        open_gguf(path)


def test_the_type_table_agrees_with_gguf_py():
    """ovchat's table of ggml types (the runtime has no gguf package) against gguf-py's."""
    gguf = pytest.importorskip("gguf")
    from ovchat.ggufcheck import GGML_TYPES

    theirs = {int(t): (t.name, block, size) for t, (block, size) in gguf.GGML_QUANT_SIZES.items()}
    assert {k: v for k, v in GGML_TYPES.items() if k in theirs} == {k: v for k, v in theirs.items() if k in GGML_TYPES}
    assert set(theirs) <= set(GGML_TYPES), sorted(set(theirs) - set(GGML_TYPES))
