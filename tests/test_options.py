"""Generation options: what users type must be validated before a model is ever loaded."""

import pytest

from ovchat.errors import OptionError
from ovchat.options import GenerationOptions


def test_defaults_are_greedy_with_the_samples_reply_length():
    o = GenerationOptions()
    assert o.max_new_tokens == 1024 and o.temperature == 0 and o.seed is None


@pytest.mark.parametrize("values, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2**64}, "max_new_tokens"),
    ({"top_k": 2**64}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 5}, "unknown generation option max_tokens"),
])
def test_bad_values_are_rejected_with_the_option_named(values, message):
    with pytest.raises(OptionError, match=message):
        GenerationOptions.from_mapping(values)


def test_text_values_as_typed_at_the_repl():
    o = GenerationOptions().with_text_value("top-k", "40").with_text_value("temperature", "0.7")
    o = o.with_text_value("stop", "END|STOP").with_text_value("seed", "7")
    assert (o.top_k, o.temperature, o.stop, o.seed) == (40, 0.7, ("END", "STOP"), 7)
    assert o.with_text_value("seed", "none").seed is None
    with pytest.raises(OptionError, match="whole number"):
        o.with_text_value("max_new_tokens", "many")
    with pytest.raises(OptionError, match="unknown option"):
        o.with_text_value("colour", "blue")


def test_mapping_onto_genai_config():
    import openvino_genai

    config = GenerationOptions(temperature=0.5, top_k=5, seed=3, stop=("x",)).settings(9).to_genai(
        openvino_genai.GenerationConfig())
    assert config.do_sample and config.temperature == pytest.approx(0.5)
    assert (config.top_k, config.rng_seed, config.max_new_tokens) == (5, 3, 9)
    assert config.stop_strings == {"x"}
    greedy = GenerationOptions().settings().to_genai(openvino_genai.GenerationConfig())
    assert not greedy.do_sample and greedy.max_new_tokens == 1024
