"""`ovchat run` and the CLI's promises: real model, real process, one-line errors."""

import json
import subprocess
import sys
import time

import pytest
import click
from click.testing import CliRunner

from conftest import run_ovchat
from ovchat.cli import main


@pytest.mark.slow
def test_run_answers_paris_with_the_default_model(demo_model):
    done = run_ovchat("run", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout.decode()
    assert b"using CPU (auto: no GPU reported by OpenVINO" in done.stderr


@pytest.mark.slow
def test_run_reads_stdin_and_prints_json_with_metrics(demo_model):
    done = run_ovchat("run", "--json", "--max-new-tokens", "20", input="What is the capital of France?".encode())
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert "Paris" in data["text"] and data["device"] == "CPU"
    assert data["metrics"]["generated_tokens"] <= 20 and data["metrics"]["prompt_tokens"] > 5


@pytest.mark.slow
def test_run_stats_go_to_stderr_and_keep_stdout_clean(demo_model):
    done = run_ovchat("run", "-", "--stats", "--system", "Answer in one word.",
                      input=b"What is the capital of France?")
    assert done.returncode == 0
    assert b"decode speed:" in done.stderr and b"context window:" in done.stderr
    assert b"decode speed" not in done.stdout


@pytest.mark.slow
def test_run_imports_neither_torch_nor_transformers_nor_nncf(demo_model):
    code = ("import sys\nfrom ovchat.cli import main\n"
            "try:\n    main(['run', 'Say hi.', '--max-new-tokens', '8'])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'nncf', 'optimum') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def _installed_closure(requirement_lines):
    """Names of the installed distributions that these requirement lines pull in, transitively."""
    from importlib.metadata import PackageNotFoundError, requires
    import re

    seen, todo = set(), list(requirement_lines)
    while todo:
        line = todo.pop()
        dep = re.split(r"[ ;<>=!~\[(]", line, maxsplit=1)[0].lower().replace("_", "-")
        if dep in seen:
            continue
        seen.add(dep)
        try:
            todo += [r for r in requires(dep) or [] if "extra ==" not in r]  # their extras are not pulled
        except PackageNotFoundError:
            pass
    return seen


def test_base_install_pulls_no_torch_transformers_or_nncf():
    """Walk the installed dependency closure of ovchat's base requirements."""
    from importlib.metadata import requires

    base = _installed_closure(r for r in requires("ovchat") if "extra ==" not in r)
    assert {"openvino-genai", "openvino", "openvino-tokenizers", "click"} <= base
    assert not base & {"torch", "transformers", "nncf", "optimum", "optimum-intel"}


def test_the_convert_extra_pulls_no_torch():
    from importlib.metadata import requires

    convert = _installed_closure(r.split(";")[0] for r in requires("ovchat")
                                 if "extra ==" not in r or 'extra == "convert"' in r)
    assert {"nncf", "transformers", "gguf", "tokenizers"} <= convert
    assert not convert & {"torch", "optimum", "optimum-intel"}


def test_help_is_instant_and_lists_every_command():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "import sys; from ovchat.cli import main; main(['--help'])"],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0 and "run" in done.stdout and "chat" in done.stdout
    assert elapsed < 5  # a loose bound only to catch an OpenVINO import creeping into --help
    code = "import sys; from ovchat.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in sys.modules if m.startswith('openvino')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_version():
    from ovchat import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def _one_line_error(result, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    error_lines = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    return error_lines[0]


@pytest.mark.parametrize("args, message", [
    (["run", "hi", "--device", "TPU"], "unknown device 'TPU'; use one of: auto, CPU, GPU, GPU.N, NPU"),
    (["run", "hi", "--device", "GPU.3"], "device GPU.3 is not available on this machine; available: CPU"),
    (["run", "hi", "--temperature", "-1"], "temperature must be at least 0.0"),
    (["run", "hi", "--top-p", "2"], "top_p must be above 0.0 and at most 1.0"),
    (["run", "hi", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["run", "   "], "the prompt is empty"),
    (["run", "hi", "-m", "no-such-model"], "unknown model 'no-such-model'"),
    (["run", "hi", "-m", "/no/such/dir"], "model /no/such/dir does not exist"),
])
def test_bad_input_is_one_line_and_exit_1(args, message):
    line = _one_line_error(CliRunner().invoke(main, args))
    assert message in line


def test_bad_option_type_is_a_usage_error():
    result = CliRunner().invoke(main, ["run", "hi", "--top-k", "many"])
    assert result.exit_code == 2 and "'many' is not a valid integer" in result.output


def test_invalid_utf8_on_stdin():
    line = _one_line_error(CliRunner().invoke(main, ["run"], input=b"caf\xe9 \xff"))
    assert "stdin is not valid UTF-8" in line


def test_empty_stdin():
    assert "the prompt is empty" in _one_line_error(CliRunner().invoke(main, ["run", "-"], input=b""))


def test_incomplete_model_directory(tmp_path):
    (tmp_path / "openvino_model.xml").write_text("<net/>")
    line = _one_line_error(CliRunner().invoke(main, ["run", "hi", "-m", str(tmp_path)]))
    assert "is incomplete (missing openvino_model.bin" in line and "ovchat convert" in line


@pytest.mark.slow
def test_corrupt_ir_is_one_line(tmp_path, demo_model):
    """A copy of the real converted demo model with its XML cut short, then its weights."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(demo_model, bad)
    (bad / "ovchat.json").unlink()  # a hand-made directory: no manifest to catch the damage early
    xml = (bad / "openvino_model.xml").read_bytes()
    (bad / "openvino_model.xml").write_bytes(xml[: len(xml) // 2])
    done = run_ovchat("run", "hi", "-m", str(bad))
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err
    assert f"Error: could not load {bad} on CPU:" in err and len(err.strip().splitlines()) == 1
    (bad / "openvino_model.xml").write_bytes(xml)
    with open(bad / "openvino_model.bin", "r+b") as f:
        f.truncate(1000)
    done = run_ovchat("run", "hi", "-m", str(bad))
    assert done.returncode == 1 and b"Traceback" not in done.stderr and b"could not load" in done.stderr


@pytest.mark.slow
def test_prompt_over_the_context_window(demo_model):
    done = run_ovchat("run", "--max-context", "128", input=("word " * 400).encode())
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err
    assert "context window is 128; shorten it or raise --max-context" in err


def test_every_command_flag_and_variable_is_in_the_readme():
    """The README is the manual: every command, each of its options and every environment
    variable an option reads appear in it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = []
    for name, command in main.commands.items():
        if f"ovchat {name}" not in readme:
            missing.append(f"ovchat {name}")
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            if not any(flag in readme for flag in param.opts + param.secondary_opts):
                missing.append(f"ovchat {name} {param.opts[0]}")
            envvar = param.envvar if isinstance(param.envvar, str) else None
            if envvar and envvar not in readme:
                missing.append(envvar)
    assert not missing, missing
