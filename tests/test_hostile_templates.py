"""Chat templates that crash or run away never reach the renderer of ovchat's own process: they
are rendered first in a child process with a time and a memory limit (``ovchat.templatecheck``)
and refused in one line naming the model. The templates are the ones a probe found: a macro that
calls itself (a SIGSEGV of `ovchat run` and of the server), a 10 GB string, nested 100,000-step
loops, range(10**9), string doubling, and a syntax error."""

from __future__ import annotations

import shutil
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import run_ovchat
from convert_helpers import demo_gguf  # noqa: F401
from test_robustness import one_line_error

RECURSIVE = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"
BAD = {
    "recursive macro": (RECURSIVE, "crashes the renderer"),
    "a 10 GB string": ("{{ 'x' * 10000000000 }}", "to render a short conversation"),
    "nested 100,000-step loops": ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
                                  "takes more than"),
    "range(10**9)": ("{% for a in range(1000000000) %}{% endfor %}", "takes more than"),
    "string doubling": ("{% set s = 'x' %}{% for i in range(60) %}{% set s = s + s %}{% endfor %}{{ s }}",
                        "takes more than"),
    "a syntax error": ("{% for %}", "cannot be rendered"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_template_is_refused_in_bounded_time(demo_model, case, tmp_path):
    from ovchat.errors import ModelLoadError
    from ovchat.templatecheck import TIME_LIMIT_S, vet

    template, words = BAD[case]
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as refused:
        vet(demo_model, template, cache_dir=tmp_path)
    assert words in str(refused.value) and str(demo_model) in str(refused.value), str(refused.value)
    assert time.monotonic() - started < TIME_LIMIT_S + 10
    assert not list(tmp_path.iterdir())  # a refused template is not remembered


def test_a_good_template_passes_once_and_is_remembered(demo_model, tmp_path):
    from ovchat.store import chat_template
    from ovchat.templatecheck import vet

    template = chat_template(demo_model)
    assert template
    vet(demo_model, template, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.ok"))) == 1
    started = time.monotonic()
    vet(demo_model, template, cache_dir=tmp_path)
    assert time.monotonic() - started < 0.5  # no child the second time


def _with_template(demo_model, tmp_path, template):
    """A copy of the demo model (without its manifest: a directory a user made) whose tokenizer
    carries ``template``."""
    model = tmp_path / "model"
    shutil.copytree(demo_model, model, ignore=shutil.ignore_patterns("ovchat.json"))
    xml = model / "openvino_tokenizer.xml"
    tree = ET.parse(xml)
    tree.getroot().find("rt_info/chat_template").set("value", template)
    tree.write(xml)
    return model


@pytest.mark.slow
def test_run_and_serve_refuse_a_model_whose_template_crashes(demo_model, tmp_path):
    model = _with_template(demo_model, tmp_path, RECURSIVE)
    one_line_error(run_ovchat("run", "-m", str(model), "--no-server", "Hi"), "crashes the renderer")
    done = run_ovchat("serve", "-m", str(model), "--port", "0", timeout=120)
    assert done.returncode == 1 and b"crashes the renderer" in done.stderr and b"Traceback" not in done.stderr


def test_convert_refuses_a_template_that_crashes(tmp_path, demo_gguf):  # noqa: F811
    """The template comes with the checkpoint (tokenizer_config.json); nothing is written."""
    import json

    from convert_helpers import llama_tensors, tiny_llama_config, write_hf_checkpoint

    config = tiny_llama_config()
    source = write_hf_checkpoint(tmp_path / "src", config, llama_tensors(config), tokenizer_from=demo_gguf)
    settings = json.loads((source / "tokenizer_config.json").read_text())
    settings["chat_template"] = RECURSIVE
    (source / "tokenizer_config.json").write_text(json.dumps(settings))
    done = run_ovchat("convert", str(source), str(tmp_path / "out"), "--no-receipt")
    one_line_error(done, "crashes the renderer", str(source))
    assert not (tmp_path / "out").exists()
