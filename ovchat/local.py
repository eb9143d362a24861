"""The backend on a model loaded in this process: an ``openvino_genai.LLMPipeline``.

Loading takes the load plan (``ovchat.loading``), compiles with a GPU-to-CPU fallback and, on
the CPU, warms the pipeline up (``ovchat.warmup``). Each generation runs in a worker thread whose
text chunks come back through a queue: that turns GenAI's callback streamer into a plain
iterator, and lets the caller stop a reply at any moment (the streamer answers STOP at the next
token). Each chat turn hands GenAI a fresh ``ChatHistory`` (the deprecated start_chat/finish_chat
pair is not used), so the session can trim, save and restore the conversation freely.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from ovchat.backend import Outcome, Request
from ovchat.devices import compile_with_fallback
from ovchat.errors import GenerationError, ModelLoadError, summary
from ovchat.loading import LoadPlan
from ovchat.speculation import Speculation
from ovchat.structured import settings as structured_settings
from ovchat.toolcalls import ToolPlan

_DONE = object()


class LocalBackend:
    """A model compiled in this process (``loaded`` says which, where, with which window)."""

    def __init__(self, loaded: LoadPlan, *, speculation: Optional[Speculation] = None,
                 notice: Callable[[str], None] = lambda _: None, pipeline_factory: Optional[Callable[..., Any]] = None):
        import time

        self.model_path = loaded.model_path
        self.context_limit = loaded.context_limit
        self.speculation = speculation
        start = time.perf_counter()
        self.pipeline, self.device = self._compile(loaded, pipeline_factory, notice)
        self.prompt_limit = loaded.prompt_limit(self.device)  # the NPU's MAX_PROMPT_LEN; None elsewhere
        if self.device.family == "CPU":
            self._warm_up()
        self.load_s = time.perf_counter() - start
        self.tokenizer = self.pipeline.get_tokenizer()
        self.chat_template = self.tokenizer.chat_template or ""
        self.has_chat_template = bool(self.chat_template)

    def _compile(self, loaded: LoadPlan, factory: Optional[Callable[..., Any]], notice: Callable[[str], None]):
        if factory is None:
            import openvino_genai

            factory = openvino_genai.LLMPipeline

        def compile(device) -> Any:
            props = loaded.properties(device)
            if self.speculation is not None:  # the draft model compiles with the main model's properties
                props = {**props, **self.speculation.pipeline_kwargs(device.name, props)}
            return factory(str(self.model_path), device.name, **props)

        return compile_with_fallback(compile, loaded.device, model=self.model_path, notice=notice)

    def _warm_up(self) -> None:
        """Repack the weights now rather than in the first reply, and give back the mapped
        weight pages that leaves resident (see ovchat.warmup): peak RSS 384 -> ~312 MB on the
        demo model, 5.39 -> 2.94 GB on Phi-3-mini int4."""
        from ovchat.warmup import warm_up

        try:
            warm_up(self.pipeline, self.model_path, self.speculation)
        except RuntimeError as e:
            raise ModelLoadError(f"{self.model_path} was compiled on {self.device.name} but cannot run: "
                                 f"{summary(e)}") from None

    # -- counting ---------------------------------------------------------------------------------

    def _chat_history(self, messages: List[Dict[str, Any]], plan: ToolPlan) -> Any:
        import openvino_genai

        chat = openvino_genai.ChatHistory(messages)
        tools = plan.template_tools(self.chat_template)
        if tools:
            chat.set_tools(tools)
        return chat

    def count(self, messages: List[Dict[str, Any]], plan: ToolPlan, *, add_generation_prompt: bool = True) -> int:
        text = self.tokenizer.apply_chat_template(self._chat_history(messages, plan),
                                                  add_generation_prompt=add_generation_prompt)
        return int(self.tokenizer.encode(text, add_special_tokens=False).input_ids.shape[1])

    def _prompt_ids(self, text: str) -> Sequence[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).input_ids.data[0]

    def count_text(self, text: str) -> int:
        return len(self._prompt_ids(text))

    # -- generation -------------------------------------------------------------------------------

    def generate(self, request: Request, cancel: threading.Event,
                 done: Callable[[Outcome], None]) -> Iterator[str]:
        import numpy as np
        import openvino as ov
        import openvino_genai

        plan = request.plan
        settings = request.options.settings(request.max_new_tokens,
                                            **structured_settings(request.response_format, plan))
        config = settings.to_genai(self.pipeline.get_generation_config(), self.speculation)
        if request.messages is not None:
            source = self._chat_history(request.messages, plan)
        else:
            source = ov.Tensor(np.array([self._prompt_ids(request.prompt)], dtype=np.int64))
        splitter = plan.splitter(self.chat_template)
        chunks: "queue.Queue[object]" = queue.Queue()
        result: Dict[str, Any] = {}
        running, stop = openvino_genai.StreamingStatus.RUNNING, openvino_genai.StreamingStatus.STOP

        def streamer(text: str) -> Any:
            chunks.put(text)
            return stop if cancel.is_set() else running

        def work() -> None:
            try:
                result["result"] = self.pipeline.generate(source, config, streamer)
            except RuntimeError as e:
                result["error"] = e
            finally:
                chunks.put(_DONE)

        worker = threading.Thread(target=work, name="ovchat-generate", daemon=True)
        parts: List[str] = []
        worker.start()
        try:
            while True:
                try:
                    item = chunks.get(timeout=0.1)  # a timeout keeps the main thread responsive to Ctrl-C
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                parts.append(item)  # type: ignore[arg-type]
                # Calls are not streamed: a forced one is all JSON, a chosen one is held back.
                shown = "" if plan.forced else splitter.feed(item) if splitter else item  # type: ignore[arg-type]
                if shown:
                    yield shown
        finally:
            cut = worker.is_alive()  # closed early: stop the worker at its next token
            if cut:
                cancel.set()
            worker.join()
            outcome = self._outcome(result, parts, plan, settings.max_new_tokens, cut or cancel.is_set())
            done(outcome)
        if "error" in result:
            raise GenerationError(f"generation failed: {summary(result['error'])}")
        if splitter is not None:
            rest, _ = splitter.finish()
            if rest:
                yield rest

    def _outcome(self, result: Dict[str, Any], parts: List[str], plan: ToolPlan, max_new: int,
                 cancelled: bool) -> Outcome:
        generated = result.get("result")
        whole = generated.texts[0] if generated is not None and getattr(generated, "texts", None) else "".join(parts)
        text, calls = plan.finish(whole, self.chat_template)
        if generated is None:
            return Outcome(text, tuple(calls), "cancelled" if cancelled else "stop")
        perf = generated.perf_metrics
        count = perf.get_num_generated_tokens()
        tpot_ms = perf.get_tpot().mean
        steps = len(perf.raw_metrics.m_new_token_times) - 1  # one time per model call; the first is the prompt's
        finish = "cancelled" if cancelled else "length" if count >= max_new else "stop"
        return Outcome(text, tuple(calls), finish, prompt_tokens=perf.get_num_input_tokens(), generated_tokens=count,
                       ttft_s=perf.get_ttft().mean / 1000, decode_tokens_per_s=1000 / tpot_ms if tpot_ms > 0 else 0.0,
                       generate_s=perf.get_generate_duration().mean / 1000,
                       tokens_per_step=(count - 1) / steps if steps > 0 else None)
