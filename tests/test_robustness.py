"""Nothing breaks: every way a user or a fault can feed ovchat something wrong ends in one line on
stderr and a non-zero exit (or, in the REPL, a message and the REPL goes on), and nothing a user
made is lost. The real `ovchat` binary runs each case, as a user would meet it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convert_helpers import demo_gguf, write_checkpoint  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def ovchat(*args, home=None, input: bytes = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["OVCHAT_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "ovchat.cli", *args], input=input, capture_output=True, env=env,
                          timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    err = done.stderr.decode(errors="replace")
    assert done.returncode not in (0, None), err
    assert "Traceback" not in err, err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("Error: ") and sum(line.startswith("Error:") for line in err.splitlines()) == 1, err
    for needle in needles:
        assert needle in last, last
    return last


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A converted tiny model (seconds to make), to copy into stores and damage."""
    from ovchat.convert import Recipe, convert

    src = write_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "llama", seed=3)
    return convert(src, tmp_path_factory.mktemp("conv") / "tiny", recipe=Recipe(weight_format="fp16"), receipt=False)


def store_with(home: Path, model: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(model, home / "models" / name)
    return home


# -- text that is not UTF-8 ---------------------------------------------------------------------------

@pytest.mark.slow
def test_invalid_utf8_in_the_prompt_or_system_is_one_line(demo_model):
    for args in ([b"\xff"], [b"hi", b"--system", b"\xfe\xfe"], [b"hi", b"--stop", b"\xff"]):
        done = subprocess.run([sys.executable, "-m", "ovchat.cli", "run", "-m", str(demo_model), *args],
                              capture_output=True, timeout=300)
        one_line_error(done, "not valid UTF-8")


@pytest.mark.slow
def test_the_repl_survives_bad_lines_and_bad_conversation_files(demo_model, tmp_path):
    files = {"list.json": {"format": "ovchat-conversation", "version": 1, "messages": [], "options": [1]},
             "stop5.json": {"format": "ovchat-conversation", "version": 1, "messages": [], "options": {"stop": 5}},
             "stopnull.json": {"format": "ovchat-conversation", "version": 1, "messages": [],
                               "options": {"stop": None}},
             "surrogate.json": {"format": "ovchat-conversation", "version": 1,
                                "messages": [{"role": "user", "content": "\ud800"}]}}
    for name, value in files.items():
        (tmp_path / name).write_text(json.dumps(value))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    lines = b"hello \xff there\n" + b"".join(f"/load {tmp_path / n}\n".encode() for n in [*files, "deep.json"])
    done = ovchat("chat", "-m", str(demo_model), "--max-new-tokens", "16",
                  input=lines + b"What is the capital of France?\n/bye\n")
    err, out = done.stderr.decode(), done.stdout.decode()
    assert done.returncode == 0 and "Traceback" not in err, err
    assert "not valid UTF-8" in err and "must be a mapping" in err and "stop must be a text" in err
    assert "nested too deeply" in err and "surrogate.json: message 1 is not valid UTF-8" in err
    assert "Paris" in out  # and the conversation went on


# -- the disk ---------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """Mounts small tmpfs file systems (as root): ``small_disk(name, megabytes)``."""
    mounted = []

    def mount(name: str, megabytes: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(point)],
                                  capture_output=True)
        except FileNotFoundError:
            pytest.skip("no mount command here")
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


@pytest.mark.slow
def test_convert_and_pull_onto_a_full_disk_are_one_line_and_leave_nothing(small_disk, demo_gguf):
    disk = small_disk("convert", 32)  # too small for the converted demo model (110 MB)
    out = disk / "out"
    one_line_error(ovchat("convert", str(demo_gguf), str(out), "--no-receipt"), "could not write", "full")
    assert list(disk.iterdir()) == []  # no OUTPUT, no partial directory

    # A store whose disk holds the download (fetched before, as by a first run) and 30 MB more.
    home = small_disk("home", demo_gguf.stat().st_size // 2 ** 20 + 30)
    (home / "downloads").mkdir()
    shutil.copyfile(demo_gguf, home / "downloads" / demo_gguf.name)
    one_line_error(ovchat("pull", "smollm2-135m", "--no-receipt", home=home), "could not write")
    assert [p.name for p in (home / "models").iterdir()] == []
    assert (home / "downloads" / demo_gguf.name).stat().st_size == demo_gguf.stat().st_size  # kept


def test_convert_to_an_unwritable_output_is_one_line(tmp_path, tiny_model):
    one_line_error(ovchat("convert", str(tiny_model), "/proc/ovchat-test/out"), "cannot write beside")


def test_an_unwritable_home_is_one_line(tmp_path):
    for args in (("run", "hi"), ("pull", "smollm2-135m"), ("default", "smollm2-135m")):
        one_line_error(ovchat(*args, home="/proc/ovchat-home"), "OVCHAT_HOME")


# -- the store --------------------------------------------------------------------------------------

@pytest.mark.parametrize("manifest", ["[]", "null", "not json", '{"files": {"openvino_model.xml": {"sha256": "x"}}}',
                                      '{"files": []}', "{}", '{"manifest_version": 2, "files": {}}', None])
def test_a_damaged_manifest_is_reported_and_the_rest_of_the_store_listed(manifest, tmp_path, tiny_model):
    """None: a store folder with no manifest at all (it was invisible to list and doctor)."""
    home = store_with(tmp_path / "home", tiny_model, "good", "broken")
    if manifest is None:
        (home / "models" / "broken" / "ovchat.json").unlink()
    else:
        (home / "models" / "broken" / "ovchat.json").write_text(manifest)
    listed = ovchat("list", home=home)
    rows = listed.stdout.decode().splitlines()
    assert listed.returncode == 0 and "Traceback" not in listed.stderr.decode()
    assert any(r.startswith("good ") and "fp16" in r for r in rows)
    broken = next(r for r in rows if r.startswith("broken"))
    assert "DAMAGED" in broken and "ovchat rm broken" in broken
    info = ovchat("info", "broken", home=home)
    assert info.returncode == 1 and "damaged:" in info.stdout.decode() and "Traceback" not in info.stderr.decode()
    one_line_error(ovchat("run", "-m", "broken", "hi", home=home), "damaged")
    doctor = ovchat("doctor", home=home)
    assert doctor.returncode == 1 and "FAIL model broken" in doctor.stdout.decode()
    assert "Traceback" not in doctor.stderr.decode()
    assert ovchat("info", "good", home=home).returncode == 0
    assert ovchat("rm", "broken", home=home).returncode == 0 and not (home / "models" / "broken").exists()


def test_doctor_checks_hashes_as_info_does(tmp_path, tiny_model):
    home = store_with(tmp_path / "home", tiny_model, "edited")
    xml = home / "models" / "edited" / "openvino_model.xml"
    data = bytearray(xml.read_bytes())
    size = len(data)
    data[-2] = ord("X") if data[-2] != ord("X") else ord("Y")
    xml.write_bytes(bytes(data))
    assert xml.stat().st_size == size  # the same size: only a hash can tell
    doctor = ovchat("doctor", home=home)
    assert doctor.returncode == 1 and "does not match its sha256" in doctor.stdout.decode()
    assert ovchat("info", "edited", home=home).returncode == 1


def test_rm_of_a_symlinked_entry_removes_the_link_only(tmp_path, tiny_model):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    target = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, target)
    (home / "models" / "linked").symlink_to(target)
    done = ovchat("rm", "linked", home=home)
    assert done.returncode == 0, done.stderr.decode()
    assert not (home / "models" / "linked").exists() and (target / "ovchat.json").is_file()


# -- a conversion killed outright -------------------------------------------------------------------

@pytest.mark.slow
def test_the_next_convert_removes_what_a_killed_one_left(tmp_path, demo_gguf):
    out = tmp_path / "out"
    for attempt in range(3):  # a fast machine may finish before the kill: try again
        proc = subprocess.Popen([sys.executable, "-m", "ovchat.cli", "convert", str(demo_gguf), str(out),
                                 "--weight-format", "fp16"], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stderr:
            if "building" in line:
                break
        proc.kill()
        proc.wait()
        left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        if left and not out.exists():
            break
        shutil.rmtree(out, ignore_errors=True)
    assert left, "the conversion finished before it could be killed, three times"
    # A partial directory of a live process is never touched.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".out.partial-{live.pid}-busy"
        mine.mkdir()
        done = ovchat("convert", str(demo_gguf), str(out), "--weight-format", "fp16", "--no-receipt")
        assert done.returncode == 0, done.stderr.decode()
        assert not any(p.exists() for p in left) and mine.is_dir()
    finally:
        live.kill()
