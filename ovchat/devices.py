"""Which OpenVINO device runs the model, and with which properties.

``auto`` prefers a GPU (OpenVINO's GPU plugin drives Intel GPUs) and falls back to the CPU.
The device list can be injected, so the selection is testable on machines without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, TypeVar

from ovchat.errors import DeviceError, ModelLoadError, summary

log = logging.getLogger(__name__)

KNOWN = ("auto", "CPU", "GPU", "GPU.N", "NPU")
# The window an NPU compile gets when neither the user (--max-context) nor a smaller model says
# otherwise: its shapes are static, and every token of window costs memory and compile time.
NPU_DEFAULT_WINDOW = 2048

# CPU precision, chosen by measurement (demo model, 2-core Xeon with AMX; see the README's
# Performance section). With bf16 (AMX, AVX512-BF16) the plugin computes in bf16 and quantizes the
# activations of compressed layers to 8 bits in groups of 32; both cost a small model its answers:
# teacher-forced agreement with its exact weights 94.1% by default, 97.8% in f32, 100% in f32 with
# activations quantized in groups of 128 only (which leaves a GGUF's 32-weight blocks exact), the
# only setting in which the demo answers "What is the capital of France?" with Paris. Decoding was
# no slower; turning the 8-bit activations off entirely made the plugin keep a second copy of the
# weights (+35% memory). On AVX2-only CPUs f32 is the default and nothing is quantized anyway.
# The KV cache in f16 rather than the plugin's u8 for compressed models (scripts/bench_kv_cache.py,
# 128 greedy tokens against an f32 cache): u8 made Gemma 3 270M's kept Q4_K_M diverge at token 61
# and its int4 at token 6, f16 never and at token 11; decoding within -5%..+12% of u8's speed.
# It is llama.cpp's default too. It doubles the cache's memory (Phi-3-mini: 0.4 MB a token).
CPU_ACCURACY = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "128",
                "KV_CACHE_PRECISION": "f16"}


@dataclass(frozen=True)
class DeviceChoice:
    """The device to compile for and a sentence saying why it was chosen."""

    name: str
    reason: str
    automatic: bool

    @property
    def family(self) -> str:
        return self.name.split(".")[0]


def available_devices() -> list[str]:
    """The devices OpenVINO reports on this machine, e.g. ['CPU', 'GPU.0', 'GPU.1']."""
    import openvino as ov

    return list(ov.Core().available_devices)


def choose_device(requested: str = "auto", available: Optional[Sequence[str]] = None, *,
                  npu_ready: bool = False) -> DeviceChoice:
    """Resolve ``requested`` (auto, CPU, GPU, GPU.N, NPU; case-insensitive) against the devices
    present. ``auto``: a GPU, else the NPU for a model converted for it (``npu_ready``), else the CPU."""
    devices = list(available) if available is not None else available_devices()
    want = (requested or "auto").strip()
    upper = want.upper()
    if upper == "AUTO":
        gpus = [d for d in devices if d.split(".")[0] == "GPU"]
        if gpus:
            name = "GPU" if "GPU" in gpus else sorted(gpus)[0]
            return DeviceChoice(name, f"auto: OpenVINO reports a GPU ({', '.join(gpus)})", True)
        if npu_ready and "NPU" in devices:
            return DeviceChoice("NPU", "auto: the model was converted for the NPU and OpenVINO reports one", True)
        return DeviceChoice("CPU", "auto: no GPU reported by OpenVINO, using the CPU", True)
    family, _, index = upper.partition(".")
    if family not in ("CPU", "GPU", "NPU") or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {want!r}; use one of: {', '.join(KNOWN)}")
    if _present(upper, devices):
        return DeviceChoice(upper, f"{upper} requested", False)
    raise DeviceError(f"device {upper} is not available on this machine; "
                      f"available: {', '.join(devices) or 'none'} (or use --device auto)")


def _present(name: str, devices: Sequence[str]) -> bool:
    if name in devices:
        return True
    family, _, index = name.partition(".")
    # A machine with one GPU lists it as plain "GPU"; "GPU.0" names the same device.
    if index == "0" and family in devices:
        return True
    # "GPU" means the default GPU, which exists whenever any GPU.N does.
    return not index and any(d.split(".")[0] == family for d in devices)


def npu_window(context_limit: Optional[int]) -> Tuple[int, int]:
    """(MAX_PROMPT_LEN, MIN_RESPONSE_LEN) of an NPU compile for a window of ``context_limit``
    tokens (NPU_DEFAULT_WINDOW when unknown). The NPU compiles static shapes, so the window is
    fixed at load: a quarter of it (128 to 1,024 tokens) is kept for the reply."""
    window = context_limit or NPU_DEFAULT_WINDOW
    response = min(1024, max(128, window // 4))
    if window <= response:
        raise DeviceError(f"a {window}-token window is too small for the NPU (the reply alone takes {response}); "
                          "give --max-context 512 or more")
    return window - response, response


def compile_properties(device: DeviceChoice, cache_dir: Optional[Path], *,
                       context_limit: Optional[int] = None) -> Dict[str, str]:
    """Properties for LLMPipeline: low latency, one stream, and a compiled-model cache off the CPU;
    on the NPU, the prompt and reply lengths its static shapes are compiled for.

    The cache only pays off on GPU/NPU, where compilation takes seconds; on the CPU it makes
    start-up slower, so it is left off there.
    """
    props = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if device.family == "CPU":
        props.update(CPU_ACCURACY)
    if device.family in ("GPU", "NPU") and cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        props["CACHE_DIR"] = str(cache_dir)
    if device.family == "NPU":
        prompt, response = npu_window(context_limit)
        props.update(MAX_PROMPT_LEN=str(prompt), MIN_RESPONSE_LEN=str(response))
    return props


T = TypeVar("T")


def compile_with_fallback(compile: Callable[[DeviceChoice], T], device: DeviceChoice, *, model: Path,
                          notice: Callable[[str], None]) -> Tuple[T, DeviceChoice]:
    """Run ``compile(device)``; when ``auto`` chose an accelerator that fails, retry on the CPU.

    A device the user named is never swapped silently: its failure is a ModelLoadError.
    Returns the compiled object and the device it ended up on.
    """
    try:
        return compile(device), device
    except RuntimeError as e:
        if not (device.automatic and device.family != "CPU"):
            raise ModelLoadError(f"could not load {model} on {device.name}: {summary(e)}") from None
        # auto picked an accelerator that could not take the model: the CPU always can.
        cpu = DeviceChoice("CPU", f"auto: {device.name} could not load the model ({summary(e)}), using the CPU",
                           True)
        notice(f"{device.name} could not load the model; falling back to the CPU")
        return compile(cpu), cpu
