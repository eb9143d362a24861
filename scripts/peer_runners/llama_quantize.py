"""Quantize an F16 GGUF with llama.cpp's own llama_model_quantize (as the llama-quantize tool does),
in the llama-cpp venv of scripts/bench_peers.py:

    python llama_quantize.py IN.gguf OUT.gguf Q4_K_M
"""

import ctypes
import os
import sys

import llama_cpp

TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
         "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}


def main() -> int:
    source, target, kind = sys.argv[1:4]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[kind])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"llama_model_quantize failed ({rc})", file=sys.stderr)
    return int(rc != 0)


if __name__ == "__main__":
    sys.exit(main())
