"""GGUF -> Hugging Face checkpoint (ovchat.convert.export_hf), on the real demo GGUF."""

import json

import numpy as np
import pytest

from ovchat.errors import CheckpointError, OutputExistsError

from convert_helpers import demo_gguf  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(demo_gguf, tmp_path_factory):
    from ovchat.convert.export_hf import export_hf

    return export_hf(demo_gguf, tmp_path_factory.mktemp("export") / "hf")


def test_exported_tensors_and_config_are_the_ggufs(demo_gguf, exported):
    from ovchat.convert.sources import open_checkpoint

    gguf, hf = open_checkpoint(demo_gguf), open_checkpoint(exported)
    assert hf.kind == "hf" and sorted(hf.names()) == sorted(gguf.names())
    for name in gguf.names():
        a, b = gguf.get(name), hf.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a.array.view(np.uint8), b.array.view(np.uint8)), name  # bit for bit
    expected = {**gguf.config, "torch_dtype": "float16"}
    assert {k: v for k, v in hf.config.items() if k in expected} == expected
    assert json.loads((exported / "generation_config.json").read_text()) == gguf.generation_config
    template = json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]
    assert template == gguf.field("tokenizer.chat_template")


def test_exported_tokenizer_encodes_as_genai_reads_the_gguf(demo_gguf, exported):
    import openvino_genai
    from tokenizers import Tokenizer

    text = "The bakery opens at 6:00, doesn't it? Ça coûte 3,50 € — 東京 🍞"
    ours = Tokenizer.from_file(str(exported / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    genai = openvino_genai.LLMPipeline(str(demo_gguf), "CPU").get_tokenizer()
    assert ours == [int(i) for i in genai.encode(text, add_special_tokens=False).input_ids.data[0]]


def test_exported_checkpoint_converts_to_the_same_model(demo_gguf, exported, tmp_path):
    """ovchat's fp16 conversion of the export is byte for byte its conversion of the GGUF, so it
    gives the same greedy tokens."""
    from ovchat.convert import Recipe, convert

    from_gguf = convert(demo_gguf, tmp_path / "gguf", recipe=Recipe(weight_format="fp16"))
    from_hf = convert(exported, tmp_path / "hf", recipe=Recipe(weight_format="fp16"))
    assert (from_hf / "openvino_model.bin").read_bytes() == (from_gguf / "openvino_model.bin").read_bytes()
    import openvino_genai

    def greedy(path):
        pipe = openvino_genai.LLMPipeline(str(path), "CPU")
        config = pipe.get_generation_config()
        config.max_new_tokens, config.do_sample = 16, False
        return pipe.generate("The capital of France is", config)

    assert greedy(from_hf) == greedy(from_gguf)


def test_export_refuses_non_gguf_and_existing_output(demo_gguf, exported, tmp_path):
    from ovchat.convert.export_hf import export_hf

    with pytest.raises(CheckpointError, match="not a GGUF"):
        export_hf(exported, tmp_path / "again")
    with pytest.raises(OutputExistsError):
        export_hf(demo_gguf, exported)
    assert not (tmp_path / "again").exists()
