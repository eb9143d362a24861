"""How a reply is generated: what a user sets, and what one generation runs with.

``GenerationOptions`` are the user's settings (`ovchat run` flags, ``/set``, a request's sampling
fields), validated and immutable. ``GenerationSettings`` is one generation as GenAI runs it: the
options resolved for one reply (how many tokens it may have) plus what only some callers ask for
(a grammar, log-probabilities, several choices, a forced length). It is plain data, so it crosses
the server's process boundary, and its ``to_genai`` is the one mapping onto
``openvino_genai.GenerationConfig`` that the chat session, the server, the warm-up and the
benchmark all use.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence, Tuple

from ovchat.errors import OptionError

# GenAI keeps token counts in C++ integers: a larger value is a TypeError from the binding, not a
# clear message. No model comes near it anyway.
_MAX_COUNT = 2**31 - 1


_WHOLE_NUMBERS = ("max_new_tokens", "top_k", "seed")


@dataclass(frozen=True)
class GenerationOptions:
    """How one reply is generated.

    ``temperature == 0`` means greedy decoding (the default: replies are reproducible).
    ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: Tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        # Coerce lists from JSON or /set into the hashable tuple the dataclass promises.
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:
            raise OptionError(f"stop must be a text or a list of texts, not {self.stop!r}")
        _check_int("max_new_tokens", self.max_new_tokens, low=1, cap=_MAX_COUNT)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0, cap=_MAX_COUNT)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, high=100.0, low_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**32 - 1)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise OptionError("stop strings must be non-empty text")
            check_text(s, "a stop string")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "GenerationOptions":
        """Build from a dict, rejecting keys that are not options (typos must not pass silently)."""
        if not isinstance(values, Mapping):
            raise OptionError(f"generation options must be a mapping of names to values, not {type(values).__name__}")
        cls._check_known(values)
        return cls(**values)

    def with_changes(self, **changes: Any) -> "GenerationOptions":
        """A copy with some options changed; None values are left as they were."""
        changes = {k: v for k, v in changes.items() if v is not None}
        self._check_known(changes)
        return replace(self, **changes)

    @classmethod
    def _check_known(cls, keys: Any) -> None:
        unknown = sorted(str(k) for k in set(keys) - set(cls.names()))
        if unknown:
            raise OptionError(f"unknown generation option {', '.join(unknown)}; "
                              f"known: {', '.join(cls.names())}")

    def with_text_value(self, name: str, text: str) -> "GenerationOptions":
        """Set one option from its text form, as typed at `/set KEY VALUE`."""
        name = name.replace("-", "_")
        if name not in self.names():
            raise OptionError(f"unknown option {name!r}; known: {', '.join(self.names())}")
        if name == "stop":
            value: Any = tuple(s for s in text.split("|") if s) if text not in ("", "none") else ()
        elif name == "seed" and text.lower() in ("none", "random"):
            value = None
        elif name in _WHOLE_NUMBERS:
            try:
                value = int(text)
            except ValueError:
                raise OptionError(f"{name} must be a whole number, not {text!r}") from None
        else:
            try:
                value = float(text)
            except ValueError:
                raise OptionError(f"{name} must be a number, not {text!r}") from None
        return replace(self, **{name: value})

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    def as_request(self) -> dict:
        """The options as fields of an OpenAI-style request to `ovchat serve`."""
        fields = {"temperature": self.temperature, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            fields.update(top_p=self.top_p, **({"top_k": self.top_k} if self.top_k else {}))
        if self.stop:
            fields["stop"] = list(self.stop)
        if self.seed is not None:
            fields["seed"] = self.seed
        return fields

    def settings(self, max_new_tokens: Optional[int] = None, **extra: Any) -> "GenerationSettings":
        """These options for one generation of at most ``max_new_tokens`` (default: the option's
        own), with ``extra`` GenerationSettings fields (a grammar, logprobs, n...)."""
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            do_sample=self.temperature > 0, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop_strings=self.stop, rng_seed=self.seed, **extra)


@dataclass(frozen=True)
class GenerationSettings:
    """One generation, as GenAI runs it (plain data: it crosses the server's process boundary).

    ``json_schema``: a JSON schema the output must follow; ``call_choices``: or one of these
    calls, ``(function name, its parameters' JSON schema)`` (toolcalls.forced_output).
    ``num_assistant_tokens``/``max_ngram_size``: this request's own speculation settings.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_strings: Tuple[str, ...] = ()
    rng_seed: Optional[int] = None
    logprobs: bool = False
    n: int = 1
    json_schema: Optional[str] = None
    call_choices: Optional[Sequence[Sequence[str]]] = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    num_assistant_tokens: Optional[int] = None
    max_ngram_size: Optional[int] = None

    @classmethod
    def forced(cls, new_tokens: int) -> "GenerationSettings":
        """Greedy decoding of exactly ``new_tokens`` tokens, end-of-sequence ignored (warm-up, bench)."""
        return cls(max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True)

    def to_genai(self, config: Any, speculation: Any = None) -> Any:
        """Fill ``config``, the model's own GenerationConfig (so its eos ids are kept); with
        ``speculation`` (ovchat.speculation.Speculation), its fields, then this request's own."""
        from ovchat.structured import genai_config

        config.max_new_tokens = self.max_new_tokens
        config.min_new_tokens = self.min_new_tokens
        config.ignore_eos = self.ignore_eos
        config.repetition_penalty = self.repetition_penalty
        config.presence_penalty = self.presence_penalty
        config.frequency_penalty = self.frequency_penalty
        config.do_sample = self.do_sample
        if self.do_sample:
            config.temperature = self.temperature
            config.top_p = self.top_p
            if self.top_k:
                config.top_k = self.top_k
            if self.min_p:
                config.min_p = self.min_p
            # GenAI's default seed is a constant: without a seed of its own, every "random" reply
            # would be the same one. A seed given is kept, so a seeded reply is reproducible.
            config.rng_seed = self.rng_seed if self.rng_seed is not None else secrets.randbits(32)
        elif self.rng_seed is not None:
            config.rng_seed = self.rng_seed
        config.num_return_sequences = self.n
        config.stop_strings = set(self.stop_strings)
        if self.logprobs:
            config.logprobs = 1
        structured = genai_config(json_schema=self.json_schema, call_choices=self.call_choices)
        if structured is not None:
            config.structured_output_config = structured
        if speculation is not None:
            speculation.configure(config)
            if self.num_assistant_tokens is not None:
                config.num_assistant_tokens = self.num_assistant_tokens
            if self.max_ngram_size is not None:
                config.max_ngram_size = self.max_ngram_size
        return config

    def as_dict(self) -> dict:
        return asdict(self)


def check_text(value: str, what: str) -> str:
    """``value`` if it is text that can be encoded: a str made from undecodable bytes (a command
    line or terminal that was not UTF-8) holds lone surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OptionError(f"{what} is not valid UTF-8 text (at character {e.start}); fix its encoding, "
                          "e.g. with iconv") from None
    return value


def _check_int(name: str, value: Any, *, low: int, high: Optional[int] = None, cap: Optional[int] = None) -> None:
    """``high`` is part of the option's range; ``cap`` is a technical limit, named only when exceeded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{name} must be a whole number, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise OptionError(f"{name} must be {bound}, not {value}")
    if cap is not None and value > cap:
        raise OptionError(f"{name} must be at most {cap}, not {value}")


def _check_float(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{name} must be a number, not {value!r}")
    if value != value or value > high or value < low or (low_open and value == low):
        side = f"above {low}" if low_open else f"at least {low}"
        raise OptionError(f"{name} must be {side} and at most {high}, not {value}")
