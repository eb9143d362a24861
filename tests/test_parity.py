"""Optional parity tests: the numpy reference against transformers (needs torch; skipped without).

The fidelity tests compare ovchat's graphs with tests/convert_helpers.Reference, a numpy forward
pass written from the Hugging Face modeling code. These tests check that reference itself against
transformers on the same tiny random checkpoints, for every architecture ovchat builds, with
sequences longer than the sliding windows. They never run in CI (torch is not a dependency, and
must not be); run them where torch is installed: ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import numpy as np
import pytest

from convert_helpers import Reference, write_checkpoint

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity

LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
CASES = {
    "llama-llama3-tied": dict(arch="llama", tie_word_embeddings=True,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-window": dict(arch="mistral", sliding_window=6),
    "qwen2-window": dict(arch="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(arch="qwen3"),
    "phi3-window": dict(arch="phi3", sliding_window=6),
    # Phi-4-mini's shape: grouped-query heads, tied embeddings, partial rotary with LongRoPE.
    "phi4-mini-like": dict(arch="phi3", num_key_value_heads=2, tie_word_embeddings=True, partial_rotary_factor=0.75,
                           rope_scaling=LONGROPE, max_position_embeddings=64, original_max_position_embeddings=16,
                           sliding_window=None),
    "gemma3": dict(arch="gemma3"),
    "gemma3-scaled-softcap": dict(arch="gemma3", query_pre_attn_scalar=24, final_logit_softcapping=5.0,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "smollm3": dict(arch="smollm3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_transformers(case, tmp_path):
    spec = dict(CASES[case])
    path = write_checkpoint(tmp_path / case, spec.pop("arch"), seed=3, **spec)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 300, size=24)]  # > windows, > 16
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    reference = Reference(path)
    got = reference.forward(ids)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    # And a prefill then one token at a time with the cache, as the graphs are driven (LongRoPE
    # picks its factors per call, so both sides take the same calls).
    reference.reset()
    steps = np.concatenate([reference.forward(ids[:10])] + [reference.forward([t]) for t in ids[10:]])
    with torch.no_grad():
        out = model(torch.tensor([ids[:10]]), use_cache=True)
        want_steps, cache = [out.logits[0]], out.past_key_values
        for t in ids[10:]:
            out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            want_steps.append(out.logits[0])
            cache = out.past_key_values
    np.testing.assert_allclose(steps, torch.cat(want_steps).double().numpy(), atol=2e-4, rtol=1e-3)
