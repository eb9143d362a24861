"""``ovchat bench``: load time, time to first token, decode speed and peak memory of a model.

Every measured run happens in a fresh Python process (``python -m ovchat.bench``), so that load
time, cold start and peak RSS are those of a user starting ovchat, not of a process that has
already paid for imports or holds another model. One extra run goes first and is not counted
(it warms the page cache, as a second start of ovchat on a box would find it).

Inside each process: the model is loaded through ``ChatSession`` (what ``ovchat run`` does), one
short generation warms the compiled kernels up, and one generation is measured. The prompt is a
fixed text, chat-templated, cut or padded to exactly the requested number of tokens and given to
the pipeline as token ids; generation is greedy and forced to exactly the requested number of new
tokens (``min_new_tokens`` with ``ignore_eos``), so every run, and every peer in
``scripts/bench_peers.py``, does the same work.

The numbers:

- ``load_s``: ChatSession construction (resolve the model, choose the device, compile the model,
  tokenizer and detokenizer);
- ``cold_start_s``: process start to the first new token of the first generation (interpreter
  start, imports, load, first inference);
- ``ttft_s`` and ``decode_tokens_per_s``: of the measured generation, from the time each new
  token reaches a token-level streamer: the call to the first new token, and the tokens after
  the first over the time from the first to the last;
- ``peak_rss_bytes``: the process's high-water mark of resident memory (VmHWM; ru_maxrss
  elsewhere) over its whole life (interpreter, libraries, model, KV cache), file-backed pages of
  memory-mapped weights included.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ovchat.errors import InputError, ModelLoadError, OvchatError
from ovchat.machine import peak_resident_bytes
from ovchat.progress import Progress, ProgressCallback, ignore

log = logging.getLogger(__name__)

# The fixed user message of every benchmark prompt: ordinary English prose, so its tokens look
# like a chat's. It is repeated as often as the requested prompt length needs.
PROMPT_TEXT = (
    "Please read the following notes about a small bakery and then write a friendly summary for a "
    "new employee. The bakery opens at six in the morning, six days a week, and is closed on "
    "Mondays. Bread is baked before sunrise; pastries follow at eight, and cakes are made to order "
    "in the afternoon. The ovens are cleaned every evening, and the flour delivery arrives on "
    "Tuesdays and Fridays. Customers often ask about gluten-free options, which are baked on a "
    "separate table to avoid mixing. Every new employee shadows a senior baker for two weeks, "
    "learns the recipes by heart, and keeps the counter tidy between customers. "
)
WARMUP_NEW_TOKENS = 8
METRICS = ("load_s", "cold_start_s", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes")
_MARK = "\u2063OVCHAT-BENCH\u2063"  # cannot occur in a chat template


@dataclass(frozen=True)
class Stat:
    """Median, min and max of one figure over the measured runs."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class RunSample:
    """What one fresh process measured (see the module docstring for each figure)."""

    load_s: float
    cold_start_s: float
    ttft_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class BenchResult:
    """The runs of one benchmark and their summary; ``warmup`` is the uncounted first run."""

    model: str
    device: str
    prompt_tokens: int
    new_tokens: int
    runs: List[RunSample]
    warmup: RunSample
    properties: Dict[str, str]
    versions: Dict[str, str]
    rss_scope: str = ("high-water mark (VmHWM) of a fresh process per run: interpreter, libraries, model and KV "
                      "cache, mapped weight pages included")
    summary: Dict[str, Stat] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", {m: Stat.of([getattr(r, m) for r in self.runs]) for m in METRICS})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


# -- the prompt -------------------------------------------------------------------------------

def prompt_ids(tokenizer: Any, n_tokens: int, *, offset: int = 0) -> List[int]:
    """Exactly ``n_tokens`` ids of the chat-templated fixed prompt, for an openvino_genai.Tokenizer
    (a model without a chat template, a base model, gets the plain text after its BOS).

    The template is applied around a marker and the text on each side of it is encoded on its
    own, so the user message can be cut to the token, whatever the template adds. ``offset``
    starts the message that many tokens into the text (the warm-up prompt differs from the
    measured one, so no prefix cache can help the measured run).
    """
    import openvino_genai

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise InputError(f"the prompt length must be a positive number of tokens, not {n_tokens!r}")

    def encode(text: str, specials: bool = False) -> List[int]:
        return [int(i) for i in tokenizer.encode(text, add_special_tokens=specials).input_ids.data[0]] if text else []

    if tokenizer.chat_template:
        templated = tokenizer.apply_chat_template(
            openvino_genai.ChatHistory([{"role": "user", "content": _MARK}]), add_generation_prompt=True)
        prefix, found, suffix = templated.partition(_MARK)
        if not found:
            raise ModelLoadError("the model's chat template does not include the user message")
        head, tail = encode(prefix), encode(suffix)
    else:
        # A base model reads plain text, after the special tokens its tokenizer puts first (BOS).
        plain = encode(PROMPT_TEXT)
        head, tail = encode(PROMPT_TEXT, specials=True)[:-len(plain) or None], []
    room = n_tokens - len(head) - len(tail)
    if room < 1:
        raise InputError(f"the chat template alone takes {len(head) + len(tail)} tokens; ask for a "
                         f"prompt of at least {len(head) + len(tail) + 1} tokens")
    body = encode(PROMPT_TEXT)
    repeats = (offset + room) // max(1, len(body)) + 1
    body = (body * repeats)[offset:offset + room]
    return head + body + tail


def forced_config(pipe: Any, new_tokens: int) -> Any:
    """Greedy decoding of exactly ``new_tokens`` tokens (end-of-sequence tokens are ignored)."""
    from ovchat.options import GenerationSettings

    return GenerationSettings.forced(new_tokens).to_genai(pipe.get_generation_config())


# -- one run (in a fresh process) -------------------------------------------------------------

def measure_run(model: str, device: str, prompt_tokens: int, new_tokens: int, started: float) -> RunSample:
    """Load, warm up and measure once in this process; ``started`` is the process's spawn time
    (``time.time()`` in the parent just before it started this process)."""
    import numpy as np
    import openvino as ov
    import openvino_genai

    from ovchat.session import ChatSession

    begin = time.perf_counter()
    session = ChatSession(model, device=device)
    load_s = time.perf_counter() - begin
    pipe = session.pipeline
    tokenizer = pipe.get_tokenizer()
    measured_ids = prompt_ids(tokenizer, prompt_tokens)
    warmup_ids = prompt_ids(tokenizer, prompt_tokens, offset=7)

    clock = _TokenClock(openvino_genai)

    def generate(ids: List[int], n: int) -> List[int]:
        tensor = ov.Tensor(np.array([ids], dtype=np.int64))
        clock.start()
        try:
            result = pipe.generate(tensor, forced_config(pipe, n), clock.streamer)
        except RuntimeError as e:
            raise ModelLoadError(f"generation failed: {str(e).strip().splitlines()[-1][:300]}") from None
        return [int(t) for t in result.tokens[0]]

    # The first generation of a process pays for first-inference work (kernel selection, memory
    # for the KV cache); it is what a user starting ovchat waits for, so it ends the cold start.
    generate(warmup_ids, WARMUP_NEW_TOKENS)
    cold_start_s = clock.first_wall - started
    tokens = generate(measured_ids, new_tokens)
    return RunSample(
        load_s=load_s,
        cold_start_s=cold_start_s,
        ttft_s=clock.ticks[0] - clock.begin,
        decode_tokens_per_s=clock.decode_tokens_per_s(),
        peak_rss_bytes=peak_resident_bytes(),
        prompt_tokens=len(measured_ids),
        generated_tokens=len(tokens),
    )


class _TokenClock:
    """Times each new token as GenAI hands it to the streamer (a token-level streamer, so no
    text buffering delays a tick); the same clock as the peer runners of scripts/bench_peers.py."""

    def __init__(self, openvino_genai: Any):
        clock = self
        self.begin = 0.0
        self.first_wall = 0.0
        self.ticks: List[float] = []

        class Streamer(openvino_genai.StreamerBase):
            def write(self, token: Any) -> Any:
                clock.tick(len(token) if isinstance(token, list) else 1)
                return openvino_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        self.streamer = Streamer()

    def start(self) -> None:
        self.ticks = []
        self.begin = time.perf_counter()

    def tick(self, count: int) -> None:
        now = time.perf_counter()
        if not self.ticks:
            self.first_wall = time.time()
        self.ticks.extend([now] * count)

    def decode_tokens_per_s(self) -> float:
        # Tokens after the first, over the time from the first to the last (GenAI's TPOT basis).
        if len(self.ticks) < 2 or self.ticks[-1] == self.ticks[0]:
            return 0.0
        return (len(self.ticks) - 1) / (self.ticks[-1] - self.ticks[0])


def _child(argv: Sequence[str]) -> int:
    """Entry point of a run's process: arguments as JSON, the RunSample (or the error) as JSON."""
    args = json.loads(argv[0])
    out = Path(argv[1])
    try:
        sample = measure_run(args["model"], args["device"], args["prompt_tokens"], args["new_tokens"],
                             args["started"])
        out.write_text(json.dumps({"sample": asdict(sample)}), encoding="utf-8")
    except OvchatError as e:
        out.write_text(json.dumps({"error": str(e)}), encoding="utf-8")
        return 1
    return 0


# -- the benchmark ----------------------------------------------------------------------------

def measure_in_fresh_process(model: str, device: str, prompt_tokens: int, new_tokens: int,
                             timeout: float = 900) -> RunSample:
    """One run (see the module docstring) in a new Python process; raises OvchatError if it fails."""
    with tempfile.TemporaryDirectory(prefix="ovchat-bench-") as tmp:
        out = Path(tmp) / "run.json"
        started = time.time()
        args = json.dumps({"model": model, "device": device, "prompt_tokens": prompt_tokens,
                           "new_tokens": new_tokens, "started": started})
        try:
            proc = subprocess.run([sys.executable, "-m", "ovchat.bench", args, str(out)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OvchatError(f"a benchmark run took more than {timeout:.0f} s; ask for fewer tokens") from None
        try:
            reply = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise OvchatError(f"a benchmark run failed (exit {proc.returncode}): {tail[0][:300]}") from None
    if "error" in reply:
        raise OvchatError(reply["error"])
    return RunSample(**reply["sample"])


def versions() -> Dict[str, str]:
    """Versions of the packages and interpreter the numbers depend on."""
    from ovchat import __version__
    from ovchat.machine import installed_versions

    found = {"ovchat": __version__, "python": sys.version.split()[0]}
    for name, version in installed_versions(("openvino", "openvino-genai", "openvino-tokenizers")).items():
        found[name] = version or "absent"
    return found


def run_benchmark(model: Optional[str] = None, *, prompt_tokens: int = 84, new_tokens: int = 128,
                  runs: int = 3, device: str = "auto", timeout: float = 900,
                  progress: ProgressCallback = ignore) -> BenchResult:
    """Benchmark ``model`` (a store name, a directory, a .gguf, or None for the default model).

    ``runs`` fresh processes are measured after one uncounted warm-up process.
    """
    from ovchat.loading import plan

    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1), ("runs", runs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be a whole number of at least {low}, not {value!r}")
    # Planning here pulls a missing default model once, before any run is timed.
    loaded = plan(model, device=device, progress=progress)
    path, choice = str(loaded.model_path), loaded.device
    samples: List[RunSample] = []
    for i in range(runs + 1):
        label = "warm-up run (not counted)" if i == 0 else f"run {i} of {runs}"
        progress(Progress("bench", label))
        samples.append(measure_in_fresh_process(path, choice.name, prompt_tokens, new_tokens, timeout))
        log.info("%s: %s", label, samples[-1])
    return BenchResult(model=path, device=choice.name, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                       runs=samples[1:], warmup=samples[0],
                       properties=loaded.properties(),
                       versions=versions())


if __name__ == "__main__":  # the process of one run, started by measure_in_fresh_process
    sys.exit(_child(sys.argv[1:]))
