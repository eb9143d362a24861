"""The two real models, converted with default options, against an independent reference.

The demo (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding) and Gemma 3 270M (Q4_K_M: Q4_K,
Q5_0, Q6_K and Q8_0 tensors, a 262,144-token vocabulary, no chat template) come from the package
index. The reference is tests/convert_helpers.Reference, a numpy forward pass written from the
Hugging Face modeling code, over the GGUF's tensors as the gguf package dequantizes them, with
each model's published config.json written out here: nothing of ovchat's reader or builders.
The converted models run as ovchat runs them (its CPU properties).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_ovchat
from convert_helpers import Reference, demo_gguf, gemma_gguf, hf_tensors_from_gguf  # noqa: F401

pytestmark = pytest.mark.slow

# The Hugging Face config.json of each model (HuggingFaceTB/SmolLM2-135M-Instruct, google/gemma-3-270m).
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
                "tie_word_embeddings": True}
GEMMA3_270M = {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-6,
               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
               "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "vocab_size": 262144,
               "tie_word_embeddings": True, "final_logit_softcapping": None, "rope_scaling": None,
               "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)]}
TEXT = ("The village library opened in 1912 with three hundred books donated by a retired schoolteacher. "
        "For decades it occupied two rooms above the post office, and children climbed the narrow stairs "
        "every Saturday to borrow adventure stories. When the building flooded in 1954, neighbours carried "
        "the books to the church hall, dried them page by page, and reopened within a month. Today the "
        "library has its own building, a reading garden and a small collection of maps that visitors from "
        "nearby towns come to study. Volunteers still repair damaged bindings by hand, and every spring "
        "they hold a sale of duplicate books to pay for new ones. "
        "Le dimanche, la bibliothèque ferme à midi, mais le jardin reste ouvert jusqu'au soir.")


@pytest.fixture(scope="module")
def gemma_model(gemma_gguf):
    """gemma-3-270m as the store has it after `ovchat pull gemma-3-270m` (catalog, default options)."""
    from ovchat.store import resolve_model

    return resolve_model("gemma-3-270m")


def _agreement(model_dir, gguf_path, config) -> float:
    """Teacher-forced top-1 agreement of the converted model (ovchat's CPU properties) with the
    numpy reference over TEXT, tokenized by the converted model's own tokenizer."""
    import openvino as ov
    import openvino_genai

    from ovchat.devices import DeviceChoice, compile_properties

    ids = np.asarray(openvino_genai.Tokenizer(str(model_dir)).encode(TEXT, add_special_tokens=True).input_ids.data)
    props = compile_properties(DeviceChoice("CPU", "test", False), None)
    compiled = ov.Core().compile_model(model_dir / "openvino_model.xml", "CPU", props)
    n = ids.shape[1]
    got = compiled.create_infer_request().infer({
        "input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, np.int32)})["logits"][0]
    want = Reference(config, hf_tensors_from_gguf(gguf_path)).forward(ids[0])
    assert n > 120
    return float(np.mean(got.argmax(-1) == want.argmax(-1)))


def test_demo_default_conversion_agrees_with_the_reference(demo_model, demo_gguf):
    manifest = json.loads((demo_model / "ovchat.json").read_text())
    assert manifest["recipe"]["weight_format"] == "keep"
    assert _agreement(demo_model, demo_gguf, SMOLLM2_135M) >= 0.95


def test_gemma_default_conversion_agrees_with_the_reference(gemma_model, gemma_gguf):
    manifest = json.loads((gemma_model / "ovchat.json").read_text())
    assert manifest["recipe"]["weight_format"] == "keep"
    assert set(manifest["kept"]) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert manifest["receipt"]["top1_agreement"] >= 0.99  # kept blocks: the float weights themselves
    assert _agreement(gemma_model, gemma_gguf, GEMMA3_270M) >= 0.95


def test_gemma_base_model_continues_text_and_refuses_chat_in_one_line(gemma_model):
    done = run_ovchat("run", "-m", "gemma-3-270m", "--raw", "The Eiffel Tower is located in the city of",
                      "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr.decode()
    assert "Paris" in done.stdout.decode()
    done = run_ovchat("run", "-m", "gemma-3-270m", "--raw", "Monday, Tuesday, Wednesday,", "--max-new-tokens", "4")
    assert "Thursday" in done.stdout.decode()
    refused = run_ovchat("run", "-m", "gemma-3-270m", "Hello there")
    err = refused.stderr.decode()
    assert refused.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: ") and "no chat template" in err and "--raw" in err
