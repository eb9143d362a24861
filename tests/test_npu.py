"""NPU-ready models and the NPU's pipeline settings.

No machine here has an NPU (nor a driver for one), so the NPU path is tested as the GPU path is:
the recipe's output is checked op by op in the IR (what the NPU compiler needs is a property of
the file), and the pipeline settings, the long-prompt refusal and the fallback by injection (a
pipeline factory that records what it is given and runs the real CPU pipeline in the NPU's
place, or fails as a compile on an NPU that cannot take the model would).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_ovchat
from convert_helpers import write_checkpoint
from ovchat.errors import ContextOverflowError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def npu_model(tmp_path_factory):
    source = write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", seed=11)
    out = tmp_path_factory.mktemp("npu") / "tiny-npu"
    done = run_ovchat("convert", str(source), str(out), "--device", "NPU", "--no-receipt")
    assert done.returncode == 0, done.stderr
    return out


def _weights(model_xml: Path):
    """Each compressed weight of the IR: (its integer constant's element type, its shape, whether
    a zero point is subtracted), found as NNCF writes them: Constant -> Convert -> [Subtract] ->
    Multiply (by the scale)."""
    import openvino as ov

    model = ov.Core().read_model(str(model_xml))
    found = []
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in ("i4", "u4", "i8", "u8"):
            continue
        users = [t.get_node() for t in op.output(0).get_target_inputs()]
        if not users or users[0].get_type_name() != "Convert" or op.get_shape()[-1] == 1:
            continue  # not a weight (a zero point has one value per row or group)
        after = [t.get_node().get_type_name() for t in users[0].output(0).get_target_inputs()]
        found.append((op.get_element_type().get_type_name(), tuple(op.get_shape()), "Subtract" in after))
    return found


def test_the_npu_recipe_is_int4_symmetric_one_group_per_channel(npu_model):
    manifest = json.loads((npu_model / "ovchat.json").read_text())
    assert manifest["recipe"]["target"] == "NPU" and manifest["recipe"]["group_size"] == -1
    assert manifest["recipe"]["ratio"] == 1.0 and manifest["recipe"]["sym"] is True
    weights = _weights(npu_model / "openvino_model.xml")
    four = [w for w in weights if w[0] in ("i4", "u4")]
    eight = [w for w in weights if w[0] in ("i8", "u8")]
    # Every layer's matrix in int4: symmetric (signed, no zero point), one scale per output
    # channel (a 2-D constant; groups would make it 3-D [rows, groups, group size]).
    assert len(four) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert all(t == "i4" and len(shape) == 2 and not zero for t, shape, zero in four), four
    # What NNCF keeps in its 8-bit backup: the embedding and the output layer only.
    assert len(eight) <= 2
    assert "npu" in run_ovchat("info", str(npu_model)).stdout.decode()


def test_the_default_recipe_is_not_the_npu_layout(tmp_path):
    """The control: the mission's recipe (group 128, ratio 0.6) differs where the NPU cares."""
    from ovchat.convert import Recipe, convert

    source = write_checkpoint(tmp_path / "src", "llama", seed=11)
    out = convert(source, tmp_path / "out", recipe=Recipe(group_size=16), receipt=False)
    weights = _weights(out / "openvino_model.xml")
    assert any(len(shape) == 3 for t, shape, _ in weights if t in ("i4", "u4"))  # groups
    assert sum(t in ("i8", "u8") for t, _, _ in weights) > 2  # 40 % of the layers stayed in 8 bits


def test_npu_refusals_on_the_command_line(tmp_path):
    source = write_checkpoint(tmp_path / "src", "llama", seed=11)
    for args, words in ((["--weight-format", "keep"], b"--device NPU needs"), (["--asym"], b"symmetric int4")):
        done = run_ovchat("convert", str(source), str(tmp_path / "o"), "--device", "NPU", *args)
        assert done.returncode == 2 and words in done.stderr, done.stderr


class FakeNpu:
    """Stands in for OpenVINO's NPU plugin: records what the pipeline is given; with ``fail``,
    raises as a compile that the NPU cannot take does; else runs the real CPU pipeline."""

    def __init__(self, fail: bool = False):
        import openvino_genai

        self.real, self.fail, self.calls = openvino_genai.LLMPipeline, fail, []

    def __call__(self, path, device, **props):
        self.calls.append((device, dict(props)))
        if device == "NPU":
            if self.fail:
                raise RuntimeError("Exception from src/plugins/intel_npu/src/plugin.cpp:\n[NPU] compile failed\n")
            from ovchat.devices import CPU_ACCURACY

            props = {k: v for k, v in props.items() if k not in ("MAX_PROMPT_LEN", "MIN_RESPONSE_LEN", "CACHE_DIR")}
            return self.real(path, "CPU", **{**props, **CPU_ACCURACY})
        return self.real(path, device, **props)


def test_npu_pipeline_settings_come_from_the_window_and_long_prompts_are_refused(demo_model):
    from ovchat.session import ChatSession

    npu = FakeNpu()
    session = ChatSession(demo_model, device="NPU", available_devices=["CPU", "NPU"], pipeline_factory=npu,
                          max_context=600)
    device, props = npu.calls[0]
    assert device == "NPU" and props["MAX_PROMPT_LEN"] == "450" and props["MIN_RESPONSE_LEN"] == "150"
    assert "CACHE_DIR" in props  # compiled blobs are cached off the CPU
    assert "Paris" in session.send("What is the capital of France?", max_new_tokens=16)
    with pytest.raises(ContextOverflowError, match="compiled for prompts of at most 450"):
        session.send("word " * 500)
    # Without --max-context the window is the NPU default (2,048), not the demo's 8,192.
    npu = FakeNpu()
    ChatSession(demo_model, device="NPU", available_devices=["CPU", "NPU"], pipeline_factory=npu)
    assert npu.calls[0][1]["MAX_PROMPT_LEN"] == "1536" and npu.calls[0][1]["MIN_RESPONSE_LEN"] == "512"


def test_auto_takes_the_npu_for_a_model_made_for_it_and_falls_back_to_the_cpu(npu_model, demo_model):
    from ovchat.session import ChatSession

    npu = FakeNpu(fail=True)
    notices = []
    session = ChatSession(npu_model, available_devices=["CPU", "NPU"], pipeline_factory=npu,
                          on_notice=notices.append)
    assert [d for d, _ in npu.calls] == ["NPU", "CPU"]
    assert session.device.name == "CPU" and notices == ["NPU could not load the model; falling back to the CPU"]
    # A model not converted for the NPU stays on the CPU under auto.
    npu = FakeNpu()
    assert ChatSession(demo_model, available_devices=["CPU", "NPU"], pipeline_factory=npu).device.name == "CPU"
    assert [d for d, _ in npu.calls] == ["CPU"]
    # Named, a failing NPU is an error, not a silent fallback.
    with pytest.raises(Exception, match=r"on NPU: .*compile failed"):
        ChatSession(npu_model, device="NPU", available_devices=["CPU", "NPU"], pipeline_factory=FakeNpu(fail=True))
