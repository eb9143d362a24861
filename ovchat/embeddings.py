"""Sentence embeddings: a converted sentence encoder turning texts into vectors.

``Embedder`` loads an encoder converted by ovchat (its manifest says how it pools), tokenizes
with the model's openvino-tokenizers IR, truncating each text to the model's window (as
sentence-transformers does) and saying which were cut, runs the encoder in batches of similar
lengths, pools every token's state into one vector as the model was trained to (mean, CLS or last
token) and L2-normalizes where the model says. The same IR loads in
``openvino_genai.TextEmbeddingPipeline`` given that pooling (tests/test_embeddings.py checks the
two agree); ovchat pools itself so that it can take token ids as input, report truncation and
cut a vector to fewer dimensions.

``rank`` orders texts by cosine similarity to a query: retrieval in one call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from ovchat.errors import InputError, ModelLoadError, summary
from ovchat.options import check_text
from ovchat.progress import ProgressCallback, ignore

log = logging.getLogger(__name__)

MAX_INPUTS = 2048  # texts in one call (ovchat serve refuses more per request)
DEFAULT_BATCH = 32

Input = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Embeddings:
    """``vectors`` [n, dimensions] float32, one row per input in order; ``tokens``: what each
    input took (after truncation); ``truncated``: which inputs were longer than the window."""

    vectors: np.ndarray
    tokens: List[int]
    truncated: List[bool]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


def _json_or_empty(path: Path) -> dict:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def pool(states: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """[B, L, H] token states and their [B, L] mask -> [B, H] sentence vectors."""
    if mode == "cls":
        return states[:, 0]
    if mode == "last":
        last = np.maximum(mask.sum(1).astype(np.int64) - 1, 0)
        return states[np.arange(len(states)), last]
    weights = mask[..., None].astype(np.float32)
    return (states * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class Embedder:
    """An embedding model loaded for ``encode``/``embed``/``rank``.

    ``model``: a store name, a known name, or a model directory converted from a sentence
    encoder. ``device``: auto, CPU, GPU... as for ChatSession. ``batch_size``: texts per
    inference.
    """

    def __init__(self, model: Optional[Union[str, Path]] = None, *, device: str = "auto",
                 batch_size: int = DEFAULT_BATCH, progress: ProgressCallback = ignore,
                 notice: Any = lambda _: None):
        from ovchat.devices import compile_with_fallback
        from ovchat.loading import plan
        from ovchat.modelfiles import MODEL_XML, read_manifest

        if model is None:
            raise InputError("name the embedding model (-m): the default model is a chat model")
        loaded = plan(model, device=device, progress=progress)
        self.model_path = loaded.model_path
        manifest = read_manifest(self.model_path) if self.model_path.is_dir() else {}
        settings = manifest.get("embedding")
        if not isinstance(settings, dict):
            raise InputError(f"{self.model_path.name} is a chat model, not an embedding model; convert a sentence "
                             "encoder (ovchat pull all-mpnet-base-v2)")
        self.pooling: str = settings["mode"]
        self.normalize: bool = bool(settings["normalize"])
        self.max_length: Optional[int] = settings.get("max_length")
        self.dimensions: int = int(settings.get("dimensions") or 0)
        config = _json_or_empty(self.model_path / "config.json")
        self.vocab_size: Optional[int] = config.get("vocab_size")
        self.batch_size = max(1, int(batch_size))
        start = time.perf_counter()

        def compile(device):
            import openvino as ov

            return ov.Core().compile_model(str(self.model_path / MODEL_XML), device.name, loaded.properties(device))

        import openvino_genai

        self._compiled, self.device = compile_with_fallback(compile, loaded.device, model=self.model_path,
                                                            notice=notice)
        self._inputs = {i.get_any_name() for i in self._compiled.inputs}
        self._request = self._compiled.create_infer_request()
        self.tokenizer = openvino_genai.Tokenizer(str(self.model_path))
        self.load_s = time.perf_counter() - start

    # -- tokens ---------------------------------------------------------------------------------

    def _tokenize(self, texts: Sequence[str]) -> Tuple[List[List[int]], List[bool]]:
        """Each text's ids, truncated to the window, and whether it had to be."""
        whole = self.tokenizer.encode(list(texts), add_special_tokens=True)
        lengths = whole.attention_mask.data.sum(1)
        if self.max_length is None or int(lengths.max()) <= self.max_length:
            ids = whole.input_ids.data
            return [[int(t) for t in ids[i, :lengths[i]]] for i in range(len(texts))], [False] * len(texts)
        cut = self.tokenizer.encode(list(texts), add_special_tokens=True, max_length=self.max_length, truncation=True)
        cut_lengths = cut.attention_mask.data.sum(1)
        ids = cut.input_ids.data
        return ([[int(t) for t in ids[i, :cut_lengths[i]]] for i in range(len(texts))],
                [bool(lengths[i] > cut_lengths[i]) for i in range(len(texts))])

    def _checked(self, inputs: Sequence[Input]) -> Tuple[List[List[int]], List[bool]]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if len(inputs) > MAX_INPUTS:
            raise InputError(f"{len(inputs)} inputs at once; send at most {MAX_INPUTS}")
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        for i, text in texts:
            check_text(text, f"input {i}")
        ids: List[Optional[List[int]]] = [None] * len(inputs)
        truncated = [False] * len(inputs)
        if texts:
            tokenized, cut = self._tokenize([t for _, t in texts])
            for (i, _), row, was_cut in zip(texts, tokenized, cut):
                ids[i], truncated[i] = row, was_cut
        vocab = self.vocab_size
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                continue
            row = [int(t) for t in x]
            if not row or (vocab and any(t < 0 or t >= vocab for t in row)):
                raise InputError(f"input {i} must be a non-empty list of token ids of this model")
            if self.max_length is not None and len(row) > self.max_length:
                row, truncated[i] = row[:self.max_length], True
            ids[i] = row
        return ids, truncated  # type: ignore[return-value]

    # -- vectors --------------------------------------------------------------------------------

    def embed(self, inputs: Sequence[Input], *, dimensions: Optional[int] = None) -> Embeddings:
        """Vectors for texts and/or token-id lists, in order. ``dimensions``: keep the first N of
        each vector (normalized again where the model normalizes), as Matryoshka-trained models
        allow; at most the model's own."""
        ids, truncated = self._checked(inputs)
        if dimensions is not None and not (isinstance(dimensions, int) and 0 < dimensions <= self.dimensions):
            raise InputError(f"dimensions must be from 1 to {self.dimensions}, the model's own")
        vectors = np.zeros((len(ids), self.dimensions), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            vectors[batch] = self._run([ids[i] for i in batch])
        if dimensions is not None and dimensions < self.dimensions:
            vectors = vectors[:, :dimensions]
            if self.normalize:
                vectors = normalize(vectors)
        return Embeddings(vectors, [len(r) for r in ids], truncated)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dimensions] float32: one vector per text."""
        return self.embed(list(texts)).vectors

    def _run(self, rows: List[List[int]]) -> np.ndarray:
        pad = int(self.tokenizer.get_pad_token_id()) if self.tokenizer.get_pad_token_id() >= 0 else 0
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        try:
            states = self._request.infer(feed)[0]
        except RuntimeError as e:
            raise ModelLoadError(f"the embedding model failed: {summary(e)}") from None
        vectors = pool(np.asarray(states, np.float32), mask, self.pooling)
        return normalize(vectors) if self.normalize else vectors

    def rank(self, query: str, texts: Sequence[str]) -> List[Tuple[float, int]]:
        """(cosine similarity, index) of each text to ``query``, most similar first."""
        vectors = normalize(self.encode([query, *texts]))
        scores = vectors[1:] @ vectors[0]
        return sorted(((float(s), i) for i, s in enumerate(scores)), key=lambda x: -x[0])
