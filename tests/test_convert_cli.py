"""`ovchat convert` end to end: bad input gives one line and no OUTPUT, interrupts clean up, the
demo GGUF converts to a model that agrees with GenAI and answers, and no torch is imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import as_from_a_shell
from ovchat.cli import main

from convert_helpers import (copy_demo, demo_gguf, llama_gguf_from_hf, llama_tensors, write_gguf,  # noqa: F401
                             tiny_llama_config, write_hf_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_model.py"
PROMPT = "<|im_start|>user\nWrite a short story about a robot learning to paint.<|im_end|>\n<|im_start|>assistant\n"


def run_convert(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_line_failure(done: subprocess.CompletedProcess, output: Path, match: str, *,
                            existed: bool = False) -> None:
    """One "Error:" line, last, naming ``match``; no OUTPUT left (or, where it ``existed``, only
    what was there) and no partial directory beside it."""
    err = done.stderr
    assert done.returncode != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert match in errors[0], errors[0]
    assert existed or not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], \
        list(output.parent.iterdir())


@pytest.fixture(scope="module")
def tiny_hf(demo_gguf, tmp_path_factory) -> Path:
    """A tiny random llama in Hugging Face layout with the demo model's tokenizer."""
    config = tiny_llama_config()
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", config, llama_tensors(config),
                               tokenizer_from=demo_gguf)


# --- bad input: one line, non-zero exit, nothing at OUTPUT -------------------------------------


def _break(kind: str, tmp_path: Path, tiny_hf: Path, demo_gguf: Path) -> "tuple[Path, str]":
    import shutil

    src = tmp_path / "src"
    if kind == "quant-gguf":  # a type the gguf package cannot read (llama.cpp's intermediate Q8_K)
        import gguf

        raw = np.zeros((64, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]), np.uint8)
        path = write_gguf(tmp_path / "m.gguf", "llama", {"token_embd.weight": (raw, "Q8_K")},
                          {"block_count": 1, "embedding_length": 256, "attention.head_count": 4})
        return path, "Q8_K"
    if kind.endswith("gguf"):
        config = tiny_llama_config(vocab_size=64)
        path = llama_gguf_from_hf(tmp_path / "m.gguf", config, llama_tensors(config), "Q8_0")
        os.truncate(path, path.stat().st_size - 1000)
        return path, "truncated"
    shutil.copytree(tiny_hf, src)
    if kind == "no-config":
        (src / "config.json").unlink()
        return src, "no config.json"
    if kind == "no-weights":
        (src / "model.safetensors").unlink()
        return src, "no *.safetensors"
    if kind == "unknown-arch":
        config = json.loads((src / "config.json").read_text())
        config.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
        (src / "config.json").write_text(json.dumps(config))
        return src, "GPTNeoXForCausalLM is not supported"
    if kind == "truncated-safetensors":
        f = src / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)
        return src, "truncated"
    if kind == "no-tokenizer":
        (src / "tokenizer.json").unlink()
        return src, "no tokenizer"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no-config", "no-weights", "unknown-arch", "truncated-safetensors",
                                  "truncated-gguf", "quant-gguf", "no-tokenizer"])
def test_bad_input_is_one_line(kind, tmp_path, tiny_hf, demo_gguf):
    src, match = _break(kind, tmp_path, tiny_hf, demo_gguf)
    out = tmp_path / "out"
    assert_one_line_failure(run_convert(src, out, "--weight-format", "fp16"), out, match)


def test_existing_output_needs_force(tmp_path, tiny_hf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = run_convert(tiny_hf, out)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("Error:") and "--force" in done.stderr
    assert (out / "keep.txt").read_text() == "mine"  # untouched


def test_force_never_deletes_what_ovchat_did_not_make(tmp_path, tiny_hf):
    # A folder of the user's documents, and a folder holding SOURCE itself: --force refuses both,
    # in one line, and every file stays.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    done = run_convert(tiny_hf, docs, "--force")
    assert_one_line_failure(done, docs, "ovchat did not make", existed=True)
    assert (docs / "thesis.txt").read_text() == "years of work"
    holder = tmp_path / "p"
    shutil.copytree(tiny_hf, holder / "src")
    done = run_convert(holder / "src", holder, "--force")
    assert_one_line_failure(done, holder, "holds SOURCE", existed=True)
    assert sorted(p.name for p in (holder / "src").iterdir()) == sorted(p.name for p in Path(tiny_hf).iterdir())


def test_a_folder_that_appears_during_a_conversion_is_kept(tmp_path):
    # Without --force, OUTPUT is checked at the start and again at the final rename: what another
    # process (or the user) put there meanwhile wins, and the new model is not moved over it.
    from ovchat.errors import OutputExistsError
    from ovchat.modelfiles import install_directory

    work, target = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "ovchat.json").write_text("{}")
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="kept"):
        install_directory(work, target, replace=False)
    with pytest.raises(OutputExistsError, match="did not make"):
        install_directory(work, target, replace=True)
    assert (target / "notes.txt").read_text() == "mine" and (work / "ovchat.json").exists()


def test_bad_option_is_refused_before_work(tmp_path, tiny_hf):
    out = tmp_path / "out"
    done = run_convert(tiny_hf, out, "--group-size", "0")
    assert done.returncode != 0 and "Traceback" not in done.stderr and "group size" in done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_mid_conversion_leaves_nothing(sig, tmp_path, demo_gguf):
    out = tmp_path / "out"
    for attempt in range(3):  # a fast machine may finish before the signal lands: try again
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(demo_gguf), str(out), "--weight-format", "fp16"],
                                stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=as_from_a_shell)
        lines = []
        for line in proc.stderr:  # wait until the graph is being built: weights are in flight
            lines.append(line)
            if "building" in line:
                break
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=120)
        if proc.returncode != 0:
            break
        shutil.rmtree(out)
    err = "".join(lines) + (rest or "")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_one_line_failure(done, out, "interrupted" if sig == signal.SIGINT else "terminated")


# --- conversions of a tiny checkpoint -----------------------------------------------------------


def test_tiny_conversion_force_info_and_ov_source(tmp_path, tiny_hf):
    out = tmp_path / "out"
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(tiny_hf), str(out), "--weight-format", "fp16"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["source"]["kind"] == "hf"
    assert manifest["recipe"]["weight_format"] == "fp16"
    assert {f["path"].rsplit("/", 1)[-1] for f in manifest["source"]["files"]} >= {
        "config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["source"]["files"])
    assert set(manifest["versions"]) >= {"openvino", "openvino-genai", "openvino-tokenizers", "nncf"}
    assert manifest["context_length"] == 256
    assert set(manifest["files"]) >= {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml"}

    r = runner.invoke(main, ["info", str(out)])
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.output and "weight_format=fp16" in r.output

    # --force replaces it, with another recipe.
    r = runner.invoke(main, ["convert", str(tiny_hf), str(out), "--weight-format", "int8", "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "ovchat.json").read_text())["recipe"]["weight_format"] == "int8"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    # An int8 IR is not a float source.
    r = runner.invoke(main, ["convert", str(out), str(tmp_path / "again")])
    assert r.exit_code != 0 and "already has compressed weights" in r.output

    # A float IR source is compressed, and its tokenizer copied.
    fp16 = tmp_path / "fp16"
    assert runner.invoke(main, ["convert", str(tiny_hf), str(fp16), "--weight-format", "fp16"]).exit_code == 0
    r = runner.invoke(main, ["convert", str(fp16), str(tmp_path / "from-ir"), "--weight-format", "int8"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "from-ir" / "ovchat.json").read_text())
    assert m["source"]["kind"] == "ov" and "int8_asym" in " ".join(m["bitwidth_distribution"])
    assert (tmp_path / "from-ir" / "openvino_tokenizer.xml").is_file()


def test_info_on_a_directory_without_manifest(tmp_path):
    r = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert r.exit_code != 0 and "is incomplete" in r.output


def test_no_torch_and_nncf_used_in_a_real_conversion(tmp_path, tiny_hf):
    code = (
        "import sys\n"
        "from ovchat.convert import convert, Recipe\n"
        f"convert({str(tiny_hf)!r}, {str(tmp_path / 'out')!r}, recipe=Recipe())\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'optimum' not in sys.modules\n"
        "assert 'nncf' in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    m = json.loads((tmp_path / "out" / "ovchat.json").read_text())
    assert any(k.startswith("int4") for k in m["bitwidth_distribution"])


# --- the real demo model -----------------------------------------------------------------------


def _greedy(model_path, n: int, f32: bool = True):
    import openvino_genai

    props = {"INFERENCE_PRECISION_HINT": "f32"} if f32 else {}
    pipe = openvino_genai.LLMPipeline(str(model_path), "CPU", **props)
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample, config.ignore_eos = n, False, True
    ids = pipe.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    return list(pipe.generate(ids, config).tokens[0])


def _f16_reencoding(demo_gguf: Path, path: Path) -> Path:
    """The demo GGUF with every Q4_1/Q8_0 tensor stored as the F16 of llama.cpp's dequantization
    (same metadata, tokenizer and row order): weights GenAI's GGUF reader takes exactly."""
    import gguf

    reader = gguf.GGUFReader(str(demo_gguf))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            w.add_uint32(key, 1)  # MOSTLY_F16
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        w.add_tensor(t.name, a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.slow
def test_demo_fp16_greedy_tokens_match_genai(demo_gguf, tmp_path):
    """64 greedy tokens of the demo converted with --weight-format fp16 equal GenAI's own GGUF loading.

    GenAI stores a Q4_1 block's minimum as an integer 4-bit zero point, which moves weights by up
    to half a quantization step, so its reading of the Q4_1 file itself is not exact; the
    comparison is on the same weights in F16 (which GenAI reads exactly), and the Q4_1 file's
    conversion is shown to give the same model as that F16 file's.
    """
    from ovchat.convert import Recipe, convert

    f16 = _f16_reencoding(demo_gguf, tmp_path / "demo-f16.gguf")
    ours_q41 = convert(demo_gguf, tmp_path / "q41", recipe=Recipe(weight_format="fp16"))
    ours_f16 = convert(f16, tmp_path / "f16", recipe=Recipe(weight_format="fp16"))
    assert (ours_q41 / "openvino_model.bin").read_bytes() == (ours_f16 / "openvino_model.bin").read_bytes()
    reference = _greedy(f16, 64)
    assert _greedy(ours_q41, 64) == reference


@pytest.mark.slow
def test_demo_default_keeps_its_q4_1_blocks_and_answers_paris(demo_gguf, tmp_path):
    """The demo GGUF is already 4-bit: the default conversion keeps its blocks (no second
    quantization), says so, and the model answers as the float weights do."""
    import openvino_genai

    from ovchat.devices import DeviceChoice, compile_properties

    out = tmp_path / "kept"
    done = run_convert(demo_gguf, out)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "keeping the GGUF's own quantization" in done.stderr
    assert "int4_asym, group size 32" in done.stderr  # Q4_1's blocks, in the bitwidth table
    assert done.stdout.strip() == str(out)
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["recipe"]["weight_format"] == "keep"
    assert manifest["kept"]["Q4_1"]["tensors"] == 210 and manifest["kept"]["Q8_0"]["tensors"] == 1
    assert manifest["receipt"]["top1_agreement"] == 1.0  # the very weights of the GGUF
    props = compile_properties(DeviceChoice("CPU", "test", False), None)
    pipe = openvino_genai.LLMPipeline(str(out), "CPU", **props)
    history = openvino_genai.ChatHistory([{"role": "user", "content": "What is the capital of France?"}])
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens, config.do_sample = 32, False
    assert "Paris" in pipe.generate(history, config).texts[0]


@pytest.mark.slow
def test_demo_int4_recipe_when_asked_quantizes_again_and_says_so(demo_gguf, tmp_path):
    out = tmp_path / "int4"
    done = run_convert(demo_gguf, out, "--weight-format", "int4", "--no-receipt")
    assert done.returncode == 0, done.stderr
    assert "already quantized" in done.stderr and "int4_sym" in done.stderr  # the warning, the table
    manifest = json.loads((out / "ovchat.json").read_text())
    assert manifest["recipe"]["weight_format"] == "int4" and manifest["kept"] == {}
    assert "skipped" in manifest["receipt"]
