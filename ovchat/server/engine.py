"""The model engine of `ovchat serve`: a ContinuousBatchingPipeline, stepped.

``ContinuousBatchingPipeline.step()`` keeps Python's GIL for the whole step (seconds for a long
prefill of a big model on a small CPU), so the HTTP side cannot share a process with it without
stalling: /health took 14 s behind a 7,000-token prompt when it did. The engine therefore runs
in a child process (as vLLM's engine core does): ``run`` is that process's main function, a loop
that reads commands from the pipe (``protocol.Add``, ``Cancel``, ``Stop``), calls ``Engine.step``
and sends back what it produced (``protocol.Step``).

``Engine`` itself knows nothing of pipes or HTTP, so a test can drive it in-process: ``add`` a
request, ``step`` until it finishes, read the ``Update``s. Prompts are prefilled in chunks of
``max_num_batched_tokens`` tokens (GenAI's dynamic split-fuse), so one step stays short and other
streams keep flowing. GenAI prefills waiting prompts strictly in arrival order, though: a short
prompt behind a 5,000-token one waited for all of it (13.6 s on the 2-core Zen 2, demo model).
So a long prompt is prefilled in turns (``_Staged``): each turn is a request of its own for a
prefix one ``TURN_TOKENS`` longer, whose earlier part the prefix cache already holds, queued
behind whatever arrived meanwhile; the request itself starts once its prompt is cached. Failures
are domain codes (``protocol``), which the client maps.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import dataclasses
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Dict, List, Optional

from ovchat.server import protocol
from ovchat.server.protocol import Failure, Tokens, Update

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5
_STATS_EVERY_S = 0.5
# A prompt longer than two turns is prefilled a turn at a time (a multiple of the KV block, 32).
TURN_TOKENS = 512
_FIRST_ID = 1 << 48  # GenAI's request ids: fresh for every request and turn (a resumed request gets a new one)


@dataclass
class _Staged:
    """A long prompt being prefilled in turns: ``done`` tokens are in the prefix cache or on the
    way (the turn ``handle`` prefills ids[:done])."""

    request: protocol.Add
    done: int
    handle: Any


@dataclass(frozen=True)
class EngineSpec:
    """How to start an engine: the model, the device and its properties, the scheduler's bounds."""

    model_path: Path
    device: str
    properties: Dict[str, str]
    max_running: int
    kv_cache_gb: int
    prefill_chunk: int = 256
    speculation: Optional[Any] = None  # ovchat.speculation.Speculation: for every request
    warm_up: bool = True
    prefix_cache: bool = True
    kind: str = "chat"  # "embedding": a sentence encoder (EmbeddingEngine)
    # The engine process lowers its priority by this much: OpenVINO's worker threads keep every
    # core busy during a long prefill (they even spin between layers), and at equal priority the
    # HTTP process waited ~100 ms for a core to answer /health on a 2-core machine.
    niceness: int = 10


class Engine:
    """One loaded model in continuous batching: ``add`` requests, ``step``, read their updates."""

    def __init__(self, spec: EngineSpec):
        import openvino_genai

        start = time.perf_counter()
        scheduler = openvino_genai.SchedulerConfig()
        # 0 (the default): GenAI allocates the KV cache as the running requests need it, 256 tokens
        # at a time; a fixed pool is touched block by block until all of it is resident (2 GB held
        # for the 110 MB demo model after some hundreds of requests). Measured on the demo, 300
        # requests of 50-400 tokens, 4 at once: the dynamic cache stays at 39 MB (engine ~500 MB).
        scheduler.cache_size = spec.kv_cache_gb
        scheduler.max_num_seqs = spec.max_running
        scheduler.max_num_batched_tokens = spec.prefill_chunk
        scheduler.dynamic_split_fuse = True
        # Finished requests' blocks stay cached while the cache has room and are reused by a
        # request that starts with the same tokens (a conversation's next turn, a shared system
        # prompt); they are the first to go when running requests need the room. Demo, turn 8 of
        # a growing conversation (737 prompt tokens): first token in 80 ms with it, 1.34 s without.
        scheduler.enable_prefix_caching = spec.prefix_cache
        properties: Dict[str, Any] = dict(spec.properties)
        if spec.speculation is not None:
            properties.update(spec.speculation.pipeline_kwargs(spec.device, spec.properties))
        self.spec = spec
        self.pipe = openvino_genai.ContinuousBatchingPipeline(str(spec.model_path), scheduler, spec.device, properties)
        if spec.warm_up and spec.device.split(".")[0] == "CPU":
            from ovchat.warmup import warm_up

            warm_up(self.pipe, spec.model_path, spec.speculation)
        self.load_s = time.perf_counter() - start
        self._handles: Dict[int, Any] = {}
        self._outputs: Dict[int, int] = {}  # rid -> number of outputs (n)
        self._staged: Dict[int, _Staged] = {}
        self._genai_ids = itertools.count(_FIRST_ID)
        # Requests added since the last step that went through: the suspects when a step fails
        # (what GenAI checks only inside a step, a grammar for one, comes with a new request).
        self._fresh: set = set()
        # What each running request asked for and the tokens it has had: enough to resume it.
        self._asked: Dict[int, protocol.Add] = {}
        self._sent: Dict[int, List[int]] = {}

    @property
    def busy(self) -> bool:
        return bool(self._handles) or bool(self._staged) or self.pipe.has_non_finished_requests()

    def add(self, request: protocol.Add) -> Optional[Update]:
        """Queue a request; an Update with its failure if GenAI refuses its settings."""
        from ovchat.errors import summary

        try:
            config = request.settings.to_genai(self.pipe.get_config(), self.spec.speculation)  # checked now
            if len(request.prompt_ids) > 2 * TURN_TOKENS and self.spec.prefix_cache:
                self._staged[request.rid] = _Staged(request, 0, None)
                self._next_turn(self._staged[request.rid])
            else:
                self._handles[request.rid] = self.pipe.add_request(next(self._genai_ids), _tensor(request.prompt_ids),
                                                                   config)
        except (RuntimeError, TypeError, ValueError) as e:
            self._staged.pop(request.rid, None)
            return Update(request.rid, failure=Failure(protocol.INVALID, summary(e)))
        self._outputs[request.rid] = request.settings.n
        self._fresh.add(request.rid)
        self._asked[request.rid], self._sent[request.rid] = request, []
        return None

    def _recover(self, error: str) -> List[Update]:
        """After a failed step: the requests that joined in it are blamed and end with
        engine_failed; the others are resumed where they were (their prompt and the tokens they
        have had, as a new request: the prefix cache holds most of it), so their clients see one
        unbroken reply. GenAI's pipeline is only usable again once every request it held is gone.
        A request that cannot be resumed exactly (several outputs, a grammar half-way through)
        ends too, as everything does when the failure cannot be pinned on a newcomer."""
        running = [*self._handles, *self._staged]
        suspects = [rid for rid in running if rid in self._fresh]
        if not suspects or len(suspects) == len(running):
            suspects = running
        survivors = [(rid, self._asked[rid], list(self._sent[rid])) for rid in running
                     if rid not in suspects and rid in self._asked]
        failure = Failure(protocol.ENGINE_FAILED, error)
        updates = [Update(rid, failure=failure) for rid in suspects]
        for rid in running:
            self.cancel(rid)
        self._fresh.clear()
        # One step with every request cancelled lets the pipeline drop them all; only then does
        # it take new ones (a request added before it failed the same way).
        for _ in range(3):
            if not self.pipe.has_non_finished_requests():
                break
            try:
                self.pipe.step()
            except RuntimeError:
                continue
        if self.pipe.has_non_finished_requests():
            survivors, suspects = [], running
            updates = [Update(rid, failure=failure) for rid in running]
        for rid, asked, sent in survivors:
            settings = asked.settings
            left = settings.max_new_tokens - len(sent)
            if settings.n != 1 or settings.json_schema or settings.call_choices or left < 1:
                updates.append(Update(rid, failure=failure))
                continue
            resumed = dataclasses.replace(settings, max_new_tokens=left,
                                          min_new_tokens=max(0, settings.min_new_tokens - len(sent)))
            self.add(protocol.Add(rid, tuple(asked.prompt_ids) + tuple(sent), resumed))
            self._asked[rid], self._sent[rid] = asked, sent  # the original request, for a later failure
            self._fresh.discard(rid)
        log.error("a generation step failed: %s; ended %s, resumed %s", error, ", ".join(map(str, suspects)),
                  ", ".join(str(rid) for rid, *_ in survivors if rid in self._handles or rid in self._staged) or "none")
        return updates

    def _next_turn(self, staged: _Staged) -> None:
        """Queue the next turn of a long prompt, or the request itself once one turn is left."""
        from ovchat.options import GenerationSettings

        request = staged.request
        staged.done += TURN_TOKENS
        if staged.done >= len(request.prompt_ids) - TURN_TOKENS:
            del self._staged[request.rid]
            config = request.settings.to_genai(self.pipe.get_config(), self.spec.speculation)
            prompt = _tensor(request.prompt_ids)
            self._handles[request.rid] = self.pipe.add_request(next(self._genai_ids), prompt, config)
            return
        config = GenerationSettings.forced(1).to_genai(self.pipe.get_config(), self.spec.speculation)
        staged.handle = self.pipe.add_request(next(self._genai_ids), _tensor(request.prompt_ids[:staged.done]), config)

    def cancel(self, rid: int) -> None:
        self._fresh.discard(rid)
        self._asked.pop(rid, None)
        self._sent.pop(rid, None)
        staged = self._staged.pop(rid, None)
        if staged is not None and staged.handle is not None:
            staged.handle.cancel()
        handle = self._handles.pop(rid, None)
        self._outputs.pop(rid, None)
        if handle is not None:
            handle.cancel()

    def step(self) -> List[Update]:
        """One scheduler step (if anything is to be done) and the news it brought."""
        updates: List[Update] = []
        if self.pipe.has_non_finished_requests():
            try:
                self.pipe.step()
            except RuntimeError as e:
                from ovchat.errors import summary

                return self._recover(summary(e))
            self._fresh.clear()
        import openvino_genai

        for staged in list(self._staged.values()):
            status = staged.handle.get_status()
            if status == openvino_genai.GenerationStatus.IGNORED:
                self.cancel(staged.request.rid)
                updates.append(Update(staged.request.rid, failure=Failure(protocol.KV_CACHE_EXCEEDED)))
            elif status != openvino_genai.GenerationStatus.RUNNING:
                self._next_turn(staged)
        for rid in list(self._handles):
            update = self._collect(rid)
            if update is not None:
                updates.append(update)
        return updates

    def _collect(self, rid: int) -> Optional[Update]:
        import openvino_genai

        handle = self._handles[rid]
        outputs: Dict[int, Tokens] = {}
        finished: Dict[int, str] = {}
        if handle.can_read():
            for index, output in handle.read().items():
                outputs[int(index)] = Tokens(tuple(int(t) for t in output.generated_ids),
                                             tuple(float(p) for p in output.generated_log_probs))
                if rid in self._sent and int(index) == 0:
                    self._sent[rid].extend(outputs[0].ids)
                if output.finish_reason != openvino_genai.GenerationFinishReason.NONE:
                    finished[int(index)] = "length" if output.finish_reason == \
                        openvino_genai.GenerationFinishReason.LENGTH else "stop"
        status = handle.get_status()
        failure = None
        if status == openvino_genai.GenerationStatus.IGNORED:
            failure = Failure(protocol.KV_CACHE_EXCEEDED)
        elif status != openvino_genai.GenerationStatus.RUNNING:
            # Finished (or stopped): every output has ended; those that did not say why ran out.
            finished.update({i: finished.get(i, "stop") for i in range(self._outputs.get(rid, 1))})
        if failure is not None or status != openvino_genai.GenerationStatus.RUNNING:
            self._handles.pop(rid)
            self._outputs.pop(rid, None)
            self._asked.pop(rid, None)
            self._sent.pop(rid, None)
        if not outputs and not finished and failure is None:
            return None
        return Update(rid, outputs, finished, failure)

    def stats(self) -> protocol.Stats:
        """The scheduler's figures (the turns of long prompts count among its requests)."""
        metrics = self.pipe.get_metrics()
        return protocol.Stats(running=int(metrics.scheduled_requests), requests=int(metrics.requests),
                              kv_cache_usage=float(metrics.cache_usage) / 100.0, active=len(self._handles),
                              kv_cache_bytes=int(metrics.kv_cache_size_in_bytes))


class EmbeddingEngine:
    """A sentence encoder in the engine process: each Embed request is answered in one step."""

    def __init__(self, spec: EngineSpec):
        from ovchat.embeddings import Embedder

        self.embedder = Embedder(spec.model_path, device=spec.device)
        self.load_s = self.embedder.load_s
        self._queue: Dict[int, protocol.Embed] = {}

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def add(self, request: protocol.Embed) -> Optional[Update]:
        self._queue[request.rid] = request
        return None

    def cancel(self, rid: int) -> None:
        self._queue.pop(rid, None)

    def step(self) -> List[Update]:
        from ovchat.errors import OvchatError

        if not self._queue:
            return []
        rid, request = next(iter(self._queue.items()))
        del self._queue[rid]
        try:
            result = self.embedder.embed(list(request.inputs), dimensions=request.dimensions)
        except OvchatError as e:
            return [Update(rid, failure=Failure(protocol.INVALID, str(e)))]
        return [Update(rid, embedded=protocol.Embedded(result.vectors, tuple(result.tokens), tuple(result.truncated)))]

    def stats(self) -> protocol.Stats:
        return protocol.Stats(requests=len(self._queue), active=len(self._queue))


def _tensor(ids: Any) -> Any:
    import numpy as np
    import openvino as ov

    return ov.Tensor(np.array([ids], dtype=np.int64))


def run(conn: Connection, spec: EngineSpec) -> None:
    """The engine process's main function: load, then serve commands until Stop or EOF."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if spec.niceness:
        _lower_priority(spec.niceness)
    from ovchat.errors import OvchatError, summary

    try:
        engine: Any = EmbeddingEngine(spec) if spec.kind == "embedding" else Engine(spec)
    except (RuntimeError, OvchatError) as e:
        conn.send(protocol.Fatal(f"could not load {spec.model_path} on {spec.device}: {summary(e)}"))
        return
    conn.send(protocol.Ready(engine.load_s, spec.device, os.getpid()))
    try:
        _serve(conn, engine)
    except (EOFError, OSError, KeyboardInterrupt):
        pass  # the HTTP process has gone: nobody is waiting


def _serve(conn: Connection, engine: Any) -> None:
    """Commands in, steps out: the pipe loop around ``Engine``."""
    last_stats = 0.0
    while True:
        busy = engine.busy
        updates: List[Update] = []
        timeout = 0 if busy else _IDLE_POLL_S
        while conn.poll(timeout):
            command = conn.recv()
            if isinstance(command, protocol.Stop):
                return
            if isinstance(command, (protocol.Add, protocol.Embed)):
                refused = engine.add(command)
                if refused is not None:
                    updates.append(refused)
            elif isinstance(command, protocol.Cancel):
                engine.cancel(command.rid)
            timeout = 0
        updates += engine.step()
        now = time.monotonic()
        if updates or (busy and now - last_stats > _STATS_EVERY_S):
            conn.send(protocol.Step(tuple(updates), engine.stats()))
            last_stats = now


def _lower_priority(niceness: int) -> None:
    try:
        os.nice(niceness)
    except (AttributeError, OSError):
        pass  # not on this platform
