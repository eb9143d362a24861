"""Warm a freshly compiled pipeline up, and give back the weight pages that leaves behind.

OpenVINO's CPU plugin memory-maps ``openvino_model.bin`` and, at the first inference, repacks
every compressed weight into its own blocked layout in anonymous memory. From then on it
computes from the repacked copy; the mapped pages it read stay resident all the same (the
kernel drops clean file pages only under memory pressure), so the process holds the weights
twice: a peak of 384 MB instead of about 312 MB for the 135M demo model, 5.39 GB instead of
2.94 GB for Phi-3-mini in int4 (2.7 GB of weights).

``warm_up`` runs that first inference at load, on a two-token prompt, while a helper thread
drops the model file's pages from this process as they are read (MADV_DONTNEED), then drops
them once more at the end. Dropping clean pages of a read-only file mapping loses nothing: a
later access (the embedding table is read row by row) faults the page back in from the page
cache or the file, and the page cache keeps them for the next start. Only read-only mappings
of the model's own weight file are touched; they live as long as the pipeline, which the
caller holds throughout. Linux only; elsewhere only the warm-up runs.

Besides the memory, the first reply no longer pays for the repacking: it moves into load time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, List

from ovchat import pages
from ovchat.modelfiles import MODEL_BIN

log = logging.getLogger(__name__)

# The helper drops pages after 20 ms, then at intervals growing by half up to 200 ms. Each drop
# unmaps pages under every thread computing the warm-up (TLB shootdowns on all cores): a fixed
# 20 ms made a Phi-3-mini load on 16 cores about 2 s slower, while 200 ms from the start would
# miss most of the demo model's 0.2 s warm-up. Phi-3-mini, 2 cores: warm-up 4.8 s without
# dropping (peak 5.39 GB), 5.25 s at a fixed 20 ms (2.87 GB), 5.1-5.2 s as here (2.94 GB).
_FIRST_DROP_S = 0.02
_LONGEST_DROP_S = 0.2


def weight_files(model_path: Path) -> List[Path]:
    """The files whose mapped pages hold the model's weights: the IR's .bin, or the .gguf itself."""
    model_path = Path(model_path)
    files = [model_path / MODEL_BIN] if model_path.is_dir() else [model_path]
    return [f.resolve() for f in files if f.is_file()]


# The warm-up prompt's length. The CPU plugin may pack weights differently for one-token decode
# steps and for prompts of several tokens, and packs each layout at its first use: a prompt of a
# couple of tokens left the prefill layout to the first reply, which then read the whole weight
# file back in (demo model: +70 MB resident).
WARM_UP_TOKENS = 32


def warm_up_ids(tokenizer: Any) -> List[int]:
    """WARM_UP_TOKENS token ids of ordinary text, for ``warm_up``."""
    ids = [int(i) for i in tokenizer.encode("The quick brown fox jumps over the lazy dog. ",
                                            add_special_tokens=False).input_ids.data[0]] or [0]
    while len(ids) < WARM_UP_TOKENS:
        ids += ids
    return ids[:WARM_UP_TOKENS]


def with_pages_dropped(model_path: Path, work: Callable[[], Any]) -> Any:
    """Run ``work`` (the first inference of a freshly compiled pipeline) while a helper thread
    drops the model file's pages from this process as they are read, then drop them once more."""
    files = weight_files(model_path)
    madvise = pages.madvise() if files else None
    done = threading.Event()

    def dropper() -> None:
        interval = _FIRST_DROP_S
        while not done.wait(interval):
            pages.drop_file_pages(files, madvise)
            interval = min(_LONGEST_DROP_S, interval * 1.5)

    helper = threading.Thread(target=dropper, name="ovchat-drop-pages", daemon=True) if madvise else None
    start = time.perf_counter()
    try:
        if helper:
            helper.start()
        return work()
    finally:
        done.set()
        if helper:
            helper.join()
        dropped = pages.drop_file_pages(files, madvise) if madvise else 0
        log.info("warm-up took %.2f s; %d MB of weight-file mappings dropped", time.perf_counter() - start,
                 dropped >> 20)


def warm_up(pipe: Any, model_path: Path, speculation: Any = None) -> None:
    """One short generation (a prefill of WARM_UP_TOKENS and a decode step) of a freshly compiled
    ``LLMPipeline`` or ``ContinuousBatchingPipeline``, with the model's weight pages dropped while
    it runs and after it. ``speculation`` (ovchat.speculation.Speculation) is the pipeline's own:
    GenAI needs its fields on every request of a speculating pipeline."""
    import numpy as np
    import openvino as ov

    from ovchat.options import GenerationSettings

    prompt = ov.Tensor(np.array([warm_up_ids(pipe.get_tokenizer())], dtype=np.int64))
    settings = GenerationSettings.forced(2)
    if hasattr(pipe, "add_request"):  # the server's continuous-batching pipeline
        config = settings.to_genai(pipe.get_config(), speculation)

        def generate() -> None:
            handle = pipe.add_request(0, prompt, config)  # dropping the handle would drop the request
            while pipe.has_non_finished_requests():
                pipe.step()
            handle.cancel()
    else:
        config = settings.to_genai(pipe.get_generation_config(), speculation)

        def generate() -> None:
            pipe.generate(prompt, config)
    with_pages_dropped(model_path, generate)
