"""Device selection with the real OpenVINO Core (CPU only here) and with injected device lists.

No machine here has an Intel GPU or an NPU, so GPU presence is simulated by injecting the
device list OpenVINO would report, and a GPU that fails to compile is simulated by a pipeline
factory that raises for GPU devices the way OpenVINO does. Everything else is real.
"""

import pytest

from ovchat.devices import DeviceChoice, available_devices, choose_device, compile_properties
from ovchat.errors import DeviceError, ModelLoadError


def test_real_core_reports_the_cpu_and_auto_picks_it():
    assert "CPU" in available_devices()
    choice = choose_device("auto")
    assert choice.name in available_devices() or choice.family == "GPU"
    if not any(d.startswith("GPU") for d in available_devices()):
        assert choice.name == "CPU" and "no GPU" in choice.reason and choice.automatic


@pytest.mark.parametrize("devices, expected", [
    (["CPU"], "CPU"),
    (["CPU", "GPU"], "GPU"),
    (["CPU", "GPU.0", "GPU.1"], "GPU.0"),
    (["CPU", "NPU"], "CPU"),  # auto never picks the NPU: it needs statically shaped models
])
def test_auto_prefers_a_gpu(devices, expected):
    assert choose_device("auto", devices).name == expected


@pytest.mark.parametrize("requested, devices, expected", [
    ("cpu", ["CPU"], "CPU"),
    ("GPU", ["CPU", "GPU.0", "GPU.1"], "GPU"),
    ("GPU.1", ["CPU", "GPU.0", "GPU.1"], "GPU.1"),
    ("GPU.0", ["CPU", "GPU"], "GPU.0"),
    ("NPU", ["CPU", "NPU"], "NPU"),
])
def test_named_devices_that_exist(requested, devices, expected):
    choice = choose_device(requested, devices)
    assert choice.name == expected and not choice.automatic


@pytest.mark.parametrize("requested, devices, message", [
    ("GPU", ["CPU"], "device GPU is not available on this machine; available: CPU"),
    ("GPU.2", ["CPU", "GPU.0", "GPU.1"], "available: CPU, GPU.0, GPU.1"),
    ("NPU", ["CPU", "GPU"], "NPU is not available"),
    ("TPU", ["CPU"], "unknown device 'TPU'"),
    ("GPU.x", ["CPU", "GPU"], "unknown device"),
])
def test_absent_or_unknown_devices_are_errors_listing_what_exists(requested, devices, message):
    with pytest.raises(DeviceError, match=message.replace(".", r"\.").replace("(", r"\(")):
        choose_device(requested, devices)


def test_properties_follow_the_original_sample_and_cache_only_off_the_cpu(tmp_path):
    cpu = compile_properties(DeviceChoice("CPU", "", True), tmp_path / "c")
    assert cpu == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
                   "DYNAMIC_QUANTIZATION_GROUP_SIZE": "128", "KV_CACHE_PRECISION": "f16"}
    assert not (tmp_path / "c").exists()
    gpu = compile_properties(DeviceChoice("GPU.1", "", False), tmp_path / "c")
    assert gpu["CACHE_DIR"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert "INFERENCE_PRECISION_HINT" not in gpu  # a GPU's own precision choices stand


class FakeGpuFactory:
    """Wraps the real LLMPipeline; a GPU device raises as OpenVINO does when compilation fails."""

    def __init__(self):
        import openvino_genai

        self.real = openvino_genai.LLMPipeline
        self.calls = []

    def __call__(self, path, device, **props):
        self.calls.append((device, props))
        if device.startswith("GPU"):
            raise RuntimeError("Exception from src/inference/src/core.cpp:112:\n"
                               "[GPU] clGetPlatformIDs failed: no OpenCL platform\n")
        return self.real(path, device, **props)


@pytest.mark.slow
def test_auto_falls_back_to_the_cpu_when_the_gpu_cannot_load(demo_model):
    from ovchat.session import ChatSession

    factory, notices = FakeGpuFactory(), []
    session = ChatSession(demo_model, available_devices=["CPU", "GPU"], pipeline_factory=factory,
                          on_notice=notices.append)
    assert [d for d, _ in factory.calls] == ["GPU", "CPU"]
    assert "CACHE_DIR" in factory.calls[0][1] and "CACHE_DIR" not in factory.calls[1][1]
    assert session.device.name == "CPU" and "GPU could not load" in session.device.reason
    assert notices == ["GPU could not load the model; falling back to the CPU"]
    assert "Paris" in session.send("What is the capital of France?", max_new_tokens=16)


@pytest.mark.slow
def test_a_named_gpu_that_fails_is_an_error_not_a_silent_fallback(demo_model):
    from ovchat.session import ChatSession

    with pytest.raises(ModelLoadError, match=r"on GPU: \[GPU\] clGetPlatformIDs failed"):
        ChatSession(demo_model, device="GPU", available_devices=["CPU", "GPU"],
                    pipeline_factory=FakeGpuFactory())
