"""Speculative decoding: several tokens per call of the model, verified in one step.

A cheap proposer guesses the next ``candidates`` tokens and the model checks them all in one
forward pass, keeping the longest run it agrees with (and its own next token), so each accepted
guess saves a model call and greedy output is what plain decoding gives, up to rounding: the
model scores the proposals together, and the CPU plugin's kernels for several tokens round
differently in the last bits from those for one, so where two tokens are nearly tied the reply
can take the other (seen on the demo model in free chat and summaries; never in copying tasks).
Two proposers, as OpenVINO GenAI has them:

- prompt lookup: the continuation of the last ``ngram`` tokens where they already occurred in the
  prompt or the reply. Free, and good where the reply repeats its input (summarising or editing a
  given document, answering from a given context); useless for free chat.
- a draft model: a smaller model with the same tokenizer. Pays only where it is much faster than
  the model and agrees with it often.

The defaults were chosen by measurement (scripts/bench_levers.py --grid, README's Performance): on
the demo model, 3 proposed tokens from up-to-3-grams were best or within a few percent of the best
on every task (editing a text 2.8x, summarising 1.9x, answering from a text 1.4x, free chat
0.93-1.0x); 5 or 8 proposals cost more in free chat (0.5-0.7x) than they gained elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ovchat.errors import OptionError

KINDS = ("prompt-lookup", "draft")
DEFAULT_CANDIDATES = 3  # tokens proposed per step (num_assistant_tokens)
DEFAULT_NGRAM = 3  # prompt lookup's longest n-gram (max_ngram_size)


@dataclass(frozen=True)
class Speculation:
    kind: str
    candidates: int = DEFAULT_CANDIDATES
    ngram: int = DEFAULT_NGRAM
    draft: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise OptionError(f"speculation {self.kind!r} is unknown; use {' or '.join(KINDS)}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or not 1 <= self.candidates <= 32:
            raise OptionError(f"the number of proposed tokens must be from 1 to 32, not {self.candidates!r}")
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or not 1 <= self.ngram <= 16:
            raise OptionError(f"the prompt-lookup n-gram size must be from 1 to 16, not {self.ngram!r}")
        if self.kind == "draft" and self.draft is None:
            raise OptionError("speculative decoding with a draft model needs the draft model (--draft-model)")

    def pipeline_kwargs(self, device: str, properties: Dict[str, str]) -> Dict[str, Any]:
        """The extra arguments of LLMPipeline (or properties of ContinuousBatchingPipeline)."""
        if self.kind == "prompt-lookup":
            return {"prompt_lookup": True}
        import openvino_genai

        return {"draft_model": openvino_genai.draft_model(str(self.draft), device, **properties)}

    def configure(self, config: Any) -> Any:
        """Set a GenerationConfig's speculation fields (GenAI requires them on every request)."""
        config.num_assistant_tokens = self.candidates
        if self.kind == "prompt-lookup":
            config.max_ngram_size = self.ngram
        return config

    def describe(self) -> str:
        if self.kind == "prompt-lookup":
            return f"prompt lookup ({self.candidates} tokens proposed from {self.ngram}-grams)"
        return f"a draft model ({self.draft.name}, {self.candidates} tokens proposed per step)"
