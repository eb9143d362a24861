"""Tokenizer conversion: GGUF metadata and tokenizer.json -> OpenVINO tokenizer IRs that give the
same ids as GenAI's own GGUF tokenizer, with the chat template and special ids in rt_info."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_helpers import demo_gguf, tiny_llama_config, llama_tensors, write_hf_checkpoint  # noqa: F401
from ovchat.convert.sources import open_checkpoint
from ovchat.convert.tokenizer import convert_tokenizer
from ovchat.errors import CheckpointError

SAMPLES = [
    "Hello world! What is the capital of France?",
    "The café's naïve façade — déjà vu, Øre, São Paulo, Ångström.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語のテキストと中文文本，还有한국어。",
    "emoji 👍🏽👨‍👩‍👧 🎉🤖 ok",
    "def f(x):\n\tif x >= 10:\n        return x ** 2  # square\n\n\n    return {'a': [1, 2, 3]}",
    "  leading   spaces\r\nand 12345678 numbers 3.14159, $1,000.00",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def demo_tokenizer_dir(demo_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-tok")
    specials = convert_tokenizer(open_checkpoint(demo_gguf), out)
    return out, specials


def _ids(tokenizer, text):
    return tokenizer.encode(text).input_ids.data.tolist()[0]


def test_demo_gguf_tokenizer_matches_genai(demo_gguf, demo_tokenizer_dir):
    import openvino_genai

    out, specials = demo_tokenizer_dir
    reference = openvino_genai.Tokenizer(str(demo_gguf))
    ours = openvino_genai.Tokenizer(str(out))
    for text in SAMPLES:
        ids = _ids(ours, text)
        assert ids == _ids(reference, text), text
        if "<|im" not in text:  # special tokens are skipped on decode by both
            assert ours.decode(ids) == text
    assert specials == {"bos_token_id": 1, "eos_token_id": 2, "eos_token_ids": [2], "pad_token_id": 2}
    assert (ours.get_bos_token_id(), ours.get_eos_token_id(), ours.get_pad_token_id()) == (1, 2, 2)
    assert ours.chat_template == reference.chat_template and "<|im_start|>" in ours.chat_template


def test_demo_gguf_tokenizer_files_and_rt_info(demo_tokenizer_dir):
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the tokenizer ops for read_model)

    out, _ = demo_tokenizer_dir
    for name in ("openvino_tokenizer", "openvino_detokenizer"):
        assert (out / f"{name}.xml").is_file() and (out / f"{name}.bin").is_file()
        model = ov.Core().read_model(out / f"{name}.xml")
        rt = model.get_rt_info()
        assert rt["chat_template"].astype(str).startswith("{% for message in messages %}")
        assert int(rt["eos_token_id"].astype(str)) == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_hf_tokenizer_json_with_several_eos_ids(demo_gguf, tmp_path):
    import openvino_genai

    config = tiny_llama_config(vocab_size=64)
    src = write_hf_checkpoint(tmp_path / "src", config, llama_tensors(config), tokenizer_from=demo_gguf)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "temperature": 0.6}))
    out = tmp_path / "out"
    specials = convert_tokenizer(open_checkpoint(src), out)
    assert specials["eos_token_ids"] == [2, 0]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0] and gen["temperature"] == 0.6
    ours = openvino_genai.Tokenizer(str(out))
    reference = openvino_genai.Tokenizer(str(demo_gguf))
    for text in SAMPLES[:6]:
        assert _ids(ours, text) == _ids(reference, text)
    assert ours.chat_template == tc["chat_template"]


def test_no_tokenizer_json(tmp_path):
    config = tiny_llama_config(vocab_size=64)
    src = write_hf_checkpoint(tmp_path / "src", config, llama_tensors(config))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        convert_tokenizer(open_checkpoint(src), tmp_path / "out")


def test_corrupt_tokenizer_json(demo_gguf, tmp_path):
    config = tiny_llama_config(vocab_size=64)
    src = write_hf_checkpoint(tmp_path / "src", config, llama_tensors(config), tokenizer_from=demo_gguf)
    text = (src / "tokenizer.json").read_text()
    (src / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="tokenizer.json is unreadable"):
        convert_tokenizer(open_checkpoint(src), tmp_path / "out")


def test_sentencepiece_gguf_tokenizer(tmp_path):
    """A Llama-2-style (SentencePiece BPE, byte fallback) GGUF vocabulary converts and round-trips.

    GenAI's GGUF reader does not take a vocabulary-only file, so this checks the behaviour
    SentencePiece defines: a bos prefix, '▁' for spaces, merges by piece score, bytes for the rest.
    """
    import gguf
    import openvino_genai

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    words = ["▁", "t", "h", "e", "w", "o", "r", "l", "d", "▁t", "he", "▁the", "▁w", "or", "ld", "▁wor", "▁world"]
    # Scores make "▁t"+"he" and "▁wor"+"ld" the winning merges, as in a real SentencePiece model.
    scores = [0.0] * len(pieces) + [-float(i) for i in range(1, len(words) + 1)]
    pieces += words
    types += [1] * len(words)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for k, v in {"block_count": 1, "embedding_length": 32, "attention.head_count": 4}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((len(pieces), 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    convert_tokenizer(open_checkpoint(tmp_path / "spm.gguf"), tmp_path / "out")
    tok = openvino_genai.Tokenizer(str(tmp_path / "out"))
    vocab = {p: i for i, p in enumerate(pieces)}
    assert _ids(tok, "the world") == [1, vocab["▁the"], vocab["▁world"]]
    # "Q" is not a piece: it falls back to its byte.
    assert _ids(tok, "Q") == [1, vocab["▁"], 3 + ord("Q")]
    for text in ("the world", "Quiet café 🤖", "two  spaces"):
        assert tok.decode(_ids(tok, text)) == text
