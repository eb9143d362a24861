"""The model engine of `ovchat serve`: a process of its own that owns the ContinuousBatchingPipeline.

``ContinuousBatchingPipeline.step()`` keeps Python's GIL for the whole step (seconds for a long
prefill of a big model on a small CPU), so the HTTP side cannot share a process with it without
stalling: /health took 14 s behind a 7,000-token prompt when it did. Here the engine runs in a
child process (as vLLM's engine core does) and talks to the HTTP process over a pipe:

    HTTP -> engine   ("add", rid, prompt_ids, settings)   ("cancel", rid)   ("stop",)
    engine -> HTTP   ("ready", info)   ("fatal", message)
                     ("step", [(rid, outputs, finished, error)], stats)

``settings`` is a plain dict (``GenerationSettings``) that the engine turns into the model's own
GenerationConfig. Each "step" message carries, per request that made progress, its new tokens by
output index (with their log-probabilities when asked for), the outputs that finished and why,
or a domain error code; and the scheduler's statistics. Long prompts are prefilled in chunks of
``max_num_batched_tokens`` tokens (GenAI's dynamic split-fuse), so one step stays short and other
streams keep flowing. The engine knows nothing of HTTP: errors are codes the client maps.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

log = logging.getLogger(__name__)

# The error codes a request can end with (the client maps them to domain errors).
INVALID = "invalid_request"
KV_CACHE_EXCEEDED = "kv_cache_exceeded"
ENGINE_FAILED = "engine_failed"

_IDLE_POLL_S = 0.5
_STATS_EVERY_S = 0.5


@dataclass
class GenerationSettings:
    """What a request asks of generation, as plain data that crosses the process boundary."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_strings: List[str] = field(default_factory=list)
    rng_seed: Optional[int] = None
    logprobs: bool = False
    n: int = 1
    json_schema: Optional[str] = None  # a JSON schema the output must follow (structured output)
    # Or one of these calls, [function name, its parameters' JSON schema] (tools.forced_output).
    call_choices: Optional[List[List[str]]] = None
    min_new_tokens: int = 0
    ignore_eos: bool = False
    num_assistant_tokens: Optional[int] = None  # speculative decoding: this request's own settings
    max_ngram_size: Optional[int] = None

    def to_genai(self, base: Any) -> Any:
        """Fill the model's own GenerationConfig (its eos ids are kept)."""
        from ovchat.structured import genai_config

        config = base
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
        config.num_return_sequences = self.n
        if self.stop_strings:
            config.stop_strings = set(self.stop_strings)
        if self.rng_seed is not None:
            config.rng_seed = self.rng_seed
        if self.logprobs:
            config.logprobs = 1
        structured = genai_config(json_schema=self.json_schema, call_choices=self.call_choices)
        if structured is not None:
            config.structured_output_config = structured
        return config

    def speculate(self, config: Any, speculation: Any) -> Any:
        """The engine's speculation settings, then this request's own where it gave them."""
        speculation.configure(config)
        if self.num_assistant_tokens is not None:
            config.num_assistant_tokens = self.num_assistant_tokens
        if self.max_ngram_size is not None:
            config.max_ngram_size = self.max_ngram_size
        return config


@dataclass(frozen=True)
class EngineSpec:
    """How to start the engine: the model, the device and its properties, the scheduler's bounds."""

    model_path: Path
    device: str
    properties: Dict[str, str]
    max_running: int
    kv_cache_gb: int
    prefill_chunk: int = 256
    speculation: Optional[Any] = None  # ovchat.speculation.Speculation: for every request
    warm_up: bool = True


def run(conn: Connection, spec: EngineSpec) -> None:
    """The engine process's main function: load, then serve commands until "stop" or EOF."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _yield_to_http()
    try:
        engine = _Engine(spec)
    except RuntimeError as e:
        from ovchat.errors import summary

        conn.send(("fatal", f"could not load {spec.model_path} on {spec.device}: {summary(e)}"))
        return
    conn.send(("ready", {"load_s": engine.load_s, "device": spec.device, "pid": os.getpid()}))
    try:
        engine.serve(conn)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the HTTP process has gone: nobody is waiting


def _yield_to_http(niceness: int = 10) -> None:
    """Lower this process's CPU priority below the HTTP process's. The engine keeps every core
    busy during a long prefill (OpenVINO's worker threads even spin between layers), and at equal
    priority the HTTP process waited ~100 ms for a core to answer /health on a 2-core machine;
    when it needs one for its few milliseconds of work it now gets it at once."""
    try:
        os.nice(niceness)
    except (AttributeError, OSError):
        pass  # not on this platform: only latency suffers


class _Engine:
    def __init__(self, spec: EngineSpec):
        import openvino_genai

        start = time.perf_counter()
        scheduler = openvino_genai.SchedulerConfig()
        scheduler.cache_size = spec.kv_cache_gb
        scheduler.max_num_seqs = spec.max_running
        scheduler.max_num_batched_tokens = spec.prefill_chunk
        scheduler.dynamic_split_fuse = True
        # Prefix caching keeps finished requests' blocks; off, the pool holds only live requests.
        scheduler.enable_prefix_caching = False
        properties: Dict[str, Any] = dict(spec.properties)
        if spec.speculation is not None:
            properties.update(spec.speculation.pipeline_kwargs(spec.device, spec.properties))
        self.speculation = spec.speculation
        self.pipe = openvino_genai.ContinuousBatchingPipeline(str(spec.model_path), scheduler, spec.device, properties)
        if spec.warm_up and spec.device.split(".")[0] == "CPU":
            self._warm_up(spec.model_path)
        self.load_s = time.perf_counter() - start
        self.handles: Dict[int, Any] = {}
        self.n: Dict[int, int] = {}

    def _warm_up(self, model_path: Path) -> None:
        """The CPU plugin repacks the weights at the first inference: do it now, dropping the
        mapped weight pages as ChatSession does (ovchat.warmup), not in the first request."""
        import openvino as ov
        import numpy as np

        from ovchat.warmup import warm_up_ids, with_pages_dropped

        ids = warm_up_ids(self.pipe.get_tokenizer())
        config = self.pipe.get_config()
        config.max_new_tokens = config.min_new_tokens = 2
        config.ignore_eos, config.do_sample = True, False
        if self.speculation is not None:
            self.speculation.configure(config)

        def generate() -> None:
            handle = self.pipe.add_request(0, ov.Tensor(np.array([ids], dtype=np.int64)), config)
            while self.pipe.has_non_finished_requests():
                self.pipe.step()
            handle.cancel()

        with_pages_dropped(model_path, generate)

    def serve(self, conn: Connection) -> None:
        last_stats = 0.0
        while True:
            busy = self.pipe.has_non_finished_requests() or bool(self.handles)
            timeout = 0 if busy else _IDLE_POLL_S
            while conn.poll(timeout):
                command = conn.recv()
                if command[0] == "stop":
                    return
                self._command(command, conn)
                timeout = 0
            updates: List[tuple] = []
            if self.pipe.has_non_finished_requests():
                try:
                    self.pipe.step()
                except RuntimeError as e:
                    from ovchat.errors import summary

                    log.error("a generation step failed: %s", summary(e))
                    updates += [(rid, {}, {}, ENGINE_FAILED) for rid in self.handles]
                    self.handles.clear()
            for rid in list(self.handles):
                update = self._collect(rid)
                if update is not None:
                    updates.append(update)
            now = time.monotonic()
            if updates or (busy and now - last_stats > _STATS_EVERY_S):
                conn.send(("step", updates, self._stats()))
                last_stats = now

    def _command(self, command: tuple, conn: Connection) -> None:
        import openvino as ov
        import numpy as np

        action, rid = command[0], command[1]
        if action == "add":
            _, _, ids, settings = command
            try:
                wanted = GenerationSettings(**settings)
                config = wanted.to_genai(self.pipe.get_config())
                if self.speculation is not None:
                    wanted.speculate(config, self.speculation)
                self.handles[rid] = self.pipe.add_request(rid, ov.Tensor(np.array([ids], dtype=np.int64)), config)
                self.n[rid] = settings.get("n", 1)
            except (RuntimeError, TypeError, ValueError) as e:
                from ovchat.errors import summary

                conn.send(("step", [(rid, {}, {}, f"{INVALID}: {summary(e)}")], self._stats()))
        elif action == "cancel" and rid in self.handles:
            self.handles.pop(rid).cancel()
            self.n.pop(rid, None)

    def _collect(self, rid: int) -> Optional[tuple]:
        """(rid, {index: (ids, logprobs)}, {index: finish reason}, error) for a request with news."""
        import openvino_genai

        handle = self.handles[rid]
        outputs: Dict[int, Tuple[List[int], List[float]]] = {}
        finished: Dict[int, str] = {}
        if handle.can_read():
            for index, output in handle.read().items():
                outputs[int(index)] = ([int(t) for t in output.generated_ids],
                                       [float(p) for p in output.generated_log_probs])
                if output.finish_reason != openvino_genai.GenerationFinishReason.NONE:
                    finished[int(index)] = "length" if output.finish_reason == \
                        openvino_genai.GenerationFinishReason.LENGTH else "stop"
        status = handle.get_status()
        error = None
        if status == openvino_genai.GenerationStatus.IGNORED:
            error = KV_CACHE_EXCEEDED
        elif status != openvino_genai.GenerationStatus.RUNNING:
            # Finished (or stopped): every output has ended; those that did not say why ran out.
            finished.update({i: finished.get(i, "stop") for i in range(self.n.get(rid, 1))})
        if error or (status != openvino_genai.GenerationStatus.RUNNING):
            self.handles.pop(rid)
            self.n.pop(rid, None)
        if not outputs and not finished and error is None:
            return None
        return rid, outputs, finished, error

    def _stats(self) -> Dict[str, Any]:
        metrics = self.pipe.get_metrics()
        return {"running": int(metrics.scheduled_requests), "requests": int(metrics.requests),
                "kv_cache_usage": float(metrics.cache_usage) / 100.0, "active": len(self.handles)}


def settings_dict(settings: GenerationSettings) -> Dict[str, Any]:
    return asdict(settings)
