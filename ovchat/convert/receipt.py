"""The accuracy receipt: how far a converted model is from the float weights it came from.

After a conversion, the converted model and the source's float weights (dequantized exactly where
the source is a quantized GGUF) read the same fixed multilingual text in one teacher-forced pass.
At every position the receipt compares their next-token distributions: the share of positions
whose most likely token is the same (top-1 agreement) and the mean KL divergence of the
converted model's distribution from the float model's. Both run in exact float32 (no bf16, no
8-bit activations, an f32 KV cache), so the receipt measures the weights and nothing else; what
the runtime's own precision costs is a separate question (``ovchat bench``).

The float model is compiled in float32, four bytes a weight, and reads a few hundred tokens:
a few seconds for the 135M demo model, and 15 GB of memory and a minute or more for a 3.8B model,
which is why ``auto`` measures only models that fit comfortably (``fits``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Union

import numpy as np

from ovchat.machine import memory_available

log = logging.getLogger(__name__)

TEXT_ID = "ovchat-multilingual-v1"
# A few hundred tokens of ordinary prose in several languages and scripts, plus a little code.
TEXT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. He polished the lens, "
    "trimmed the wick and wrote the weather in a small leather book: wind from the west, light rain, "
    "two fishing boats returning late.\n"
    "Le marché ouvre à sept heures. Les maraîchers installent leurs étals, et l'odeur du pain chaud "
    "se mêle à celle des fraises. Une vieille dame demande le prix des tomates et sourit.\n"
    "Am Wochenende fahren wir mit dem Zug in die Berge. Die Kinder freuen sich auf den See, und "
    "ich hoffe, dass das Wetter schön bleibt.\n"
    "El tren salió con diez minutos de retraso, pero llegamos a tiempo para la cena. Mi abuela "
    "había preparado una tortilla enorme y una jarra de limonada.\n"
    "In una piccola città di mare, i pescatori riparano le reti mentre i gatti dormono al sole.\n"
    "Сегодня утром шёл снег, и дети лепили снеговика во дворе.\n"
    "今天天气很好，我们去公园散步，看到很多人在放风筝。\n"
    "def mean(values):\n    return sum(values) / len(values) if values else 0.0\n"
    "In 1969, three astronauts flew to the Moon; the trip took about three days each way."
)
MAX_TOKENS = 320
# Exact float32 execution on the CPU: otherwise the plugin runs bf16 where the CPU has it,
# quantizes activations to 8 bits for compressed weights and keeps the KV cache in u8.
EXACT_F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
             "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
# ``auto`` measures a model of at most this many weights, and only if what it needs fits in half
# the free memory: about 12 bytes a weight at the peak (the float weights in f16, and compiled in
# f32, twice for a tied embedding table). Gemma 3 270M: 13 s and 3 GB more than the conversion.
AUTO_MAX_PARAMETERS = 2_000_000_000
_BYTES_PER_PARAMETER = 12


@dataclass(frozen=True)
class Receipt:
    """The receipt as the manifest stores it."""

    top1_agreement: float
    mean_kl: float
    tokens: int
    seconds: float
    text: str = TEXT_ID
    reference: str = "the source's float weights, float32 inference"

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def fits(parameters: int) -> bool:
    """Whether ``auto`` should measure a model of ``parameters`` weights on this machine."""
    return parameters <= AUTO_MAX_PARAMETERS and parameters * _BYTES_PER_PARAMETER <= memory_available() // 2


def token_ids(tokenizer_dir: Path) -> np.ndarray:
    """The receipt text as the model's own tokenizer encodes it (with its BOS), cut to MAX_TOKENS."""
    import openvino_genai

    ids = openvino_genai.Tokenizer(str(tokenizer_dir)).encode(TEXT, add_special_tokens=True).input_ids.data
    return np.asarray(ids, dtype=np.int64)[:, :MAX_TOKENS]


def logits(model: Union["ov.Model", Path], ids: np.ndarray) -> np.ndarray:  # noqa: F821
    """The model's logits [tokens, vocab] for ``ids`` [1, tokens], in one pass, exact float32."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", EXACT_F32)
    request = compiled.create_infer_request()
    n = ids.shape[1]
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "beam_idx": np.zeros(1, np.int32)}
    if any("position_ids" in i.get_names() for i in compiled.inputs):
        inputs["position_ids"] = np.arange(n, dtype=np.int64)[None]
    out = request.infer(inputs)
    return np.array(out["logits"][0], dtype=np.float32)


def compare(reference: np.ndarray, converted: np.ndarray, chunk: int = 32) -> tuple:
    """(top-1 agreement, mean KL(reference || converted)) over the positions of two logits arrays."""
    agree = float(np.mean(reference.argmax(-1) == converted.argmax(-1)))
    kl = 0.0
    for start in range(0, len(reference), chunk):
        p = _log_softmax(reference[start:start + chunk])
        q = _log_softmax(converted[start:start + chunk])
        kl += float(np.sum(np.exp(p) * (p - q)))
    return agree, kl / len(reference)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measure(converted: Path, reference: Callable[[], "ov.Model"], tokenizer_dir: Path) -> Receipt:  # noqa: F821
    """The receipt of the converted IR ``converted`` against the float model ``reference()`` builds.

    The two models are compiled one after the other, so only one float32 copy is ever resident.
    """
    start = time.perf_counter()
    ids = token_ids(tokenizer_dir)
    model = reference()
    want = logits(model, ids)
    del model
    got = logits(converted, ids)
    agreement, kl = compare(want, got)
    receipt = Receipt(top1_agreement=round(agreement, 4), mean_kl=float(f"{kl:.3g}"), tokens=int(ids.shape[1]),
                      seconds=round(time.perf_counter() - start, 2))
    log.info("receipt: %s", receipt)
    return receipt


@dataclass(frozen=True)
class EmbeddingReceipt:
    """A sentence encoder's receipt: how close its vectors are to the float weights' (cosine)."""

    mean_cosine: float
    min_cosine: float
    sentences: int
    seconds: float
    text: str = TEXT_ID
    reference: str = "the source's float weights, float32 inference"

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def measure_embeddings(converted: Path, reference: Callable[[], "ov.Model"], tokenizer_dir: Path,  # noqa: F821
                       pooling: Dict[str, object]) -> EmbeddingReceipt:
    """The receipt of a converted encoder: each line of the receipt's text embedded by the
    converted IR and by the float model, pooled as the model pools, compared by cosine."""
    import openvino as ov
    import openvino_genai

    from ovchat.embeddings import normalize, pool

    start = time.perf_counter()
    sentences = [line for line in TEXT.splitlines() if line.strip()]
    encoded = openvino_genai.Tokenizer(str(tokenizer_dir)).encode(
        sentences, add_special_tokens=True, max_length=int(pooling.get("max_length") or 512), truncation=True)
    ids, mask = np.asarray(encoded.input_ids.data, np.int64), np.asarray(encoded.attention_mask.data, np.int64)

    def vectors(model) -> np.ndarray:
        compiled = ov.Core().compile_model(model, "CPU", EXACT_F32)
        feed = {"input_ids": ids, "attention_mask": mask}
        if any("token_type_ids" in i.get_names() for i in compiled.inputs):
            feed["token_type_ids"] = np.zeros_like(ids)
        states = np.asarray(compiled.create_infer_request().infer(feed)[0], np.float32)
        return normalize(pool(states, mask, str(pooling["mode"])))

    model = reference()
    want = vectors(model)
    del model
    cosines = (vectors(converted) * want).sum(-1)
    receipt = EmbeddingReceipt(mean_cosine=round(float(cosines.mean()), 6), min_cosine=round(float(cosines.min()), 6),
                               sentences=len(sentences), seconds=round(time.perf_counter() - start, 2))
    log.info("receipt: %s", receipt)
    return receipt
