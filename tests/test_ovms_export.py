"""`ovchat export --ovms`: stored models as an OpenVINO Model Server repository.

OVMS itself cannot run here (no container runtime in CI, no network), so the repository is
checked piece by piece against what OVMS does with it: the model directory is loaded with
GenAI's ContinuousBatchingPipeline exactly as OVMS's LLM calculator does (the graph's models_path,
device, plugin_config and scheduler options) and answers; the graph has the node OVMS's
documentation requires (the HttpLLMCalculator with its LOOPBACK back edge, the two side packets,
the SyncSetInputStreamHandler) and only options LLMCalculatorOptions defines, with their types;
config.json has the shape OVMS's config schema allows for a model; the KServe manifests parse
and their runtime, model format and storage agree. Not checked here: OVMS's own parsers (its
llm_calculator.proto is not on any package index, and fetched code is not committed).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_ovchat
from convert_helpers import demo_gguf  # noqa: F401
from test_robustness import one_line_error

pytestmark = pytest.mark.slow

# LLMCalculatorOptions' fields that ovchat writes, with their proto types (OVMS src/llm/llm_calculator.proto).
OPTION_TYPES = {"models_path": str, "device": str, "max_num_seqs": int, "max_num_batched_tokens": int,
                "cache_size": int, "enable_prefix_caching": bool, "dynamic_split_fuse": bool, "plugin_config": str,
                "tool_parser": str, "reasoning_parser": str, "draft_models_path": str}
TOOL_PARSERS = {"hermes3", "llama3", "mistral", "phi4", "qwen3coder", "devstral", "gptoss"}


def graph_options(text: str) -> dict:
    """The LLMCalculatorOptions of a graph.pbtxt, as values of their types."""
    block = re.search(r"\[type\.googleapis\.com/mediapipe\.LLMCalculatorOptions\]: \{(.*?)\n    \}", text, re.S)
    assert block, text
    options = {}
    for line in block.group(1).strip().splitlines():
        key, _, raw = line.strip().partition(": ")
        raw = raw.strip()
        value = json.loads(raw) if raw.startswith('"') else raw == "true" if raw in ("true", "false") else int(raw)
        assert key in OPTION_TYPES and type(value) is OPTION_TYPES[key], (key, raw)
        options[key] = value
    return options


@pytest.fixture(scope="module")
def repository(demo_model, qwen_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ovms") / "repo"
    done = run_ovchat("export", demo_model.name, qwen_model.name, str(root), "--ovms", "--max-concurrency", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == str(root) and b"docker run" in done.stderr
    return root


def test_the_repository_has_what_ovms_reads(repository, demo_model, qwen_model):
    from ovchat.store import chat_template

    config = json.loads((repository / "config.json").read_text())
    # OVMS's schema (src/schema.cpp): model_config_list of {"config": {...}} with "name" required
    # and "base_path" a string; no other keys at either level for these models.
    assert set(config) == {"model_config_list"}
    entries = [entry["config"] for entry in config["model_config_list"]]
    assert all(set(e) == {"name", "base_path"} and isinstance(e["base_path"], str) for e in entries)
    assert [e["name"] for e in entries] == [demo_model.name, qwen_model.name]
    for entry, model in zip(entries, (demo_model, qwen_model)):
        folder = repository / entry["base_path"]
        for name in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            assert (folder / name).read_bytes() == (model / name).read_bytes() if name.endswith(".xml") \
                else (folder / name).stat().st_size == (model / name).stat().st_size
        template = chat_template(model)
        assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == template
        assert (folder / "chat_template.jinja").read_text() == template
        text = (folder / "graph.pbtxt").read_text()
        for required in ('calculator: "HttpLLMCalculator"', 'input_side_packet: "LLM_NODE_RESOURCES:llm"',
                         'input_side_packet: "LLM_NODE_EXECUTION_CONTEXTS:llm_ctx"', "back_edge: true",
                         'input_stream_handler: "SyncSetInputStreamHandler"',
                         'input_stream: "HTTP_REQUEST_PAYLOAD:input"', 'output_stream: "HTTP_RESPONSE_PAYLOAD:output"'):
            assert required in text, required
        assert text.count("{") == text.count("}")
        options = graph_options(text)
        assert options["models_path"] == "./" and options["max_num_seqs"] == 8 and options["enable_prefix_caching"]
    qwen = graph_options((repository / qwen_model.name / "graph.pbtxt").read_text())
    assert qwen["tool_parser"] == "hermes3" and qwen["tool_parser"] in TOOL_PARSERS  # <tool_call> in its template
    demo = graph_options((repository / demo_model.name / "graph.pbtxt").read_text())
    assert "tool_parser" not in demo  # its template has no place for tools


def test_the_kserve_manifests_agree(repository):
    import yaml

    runtime, service = list(yaml.safe_load_all((repository / "kserve.yaml").read_text()))
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["storageUri"] == "pvc://ovchat-models/"
    container = runtime["spec"]["containers"][0]
    assert "--config_path=/mnt/models/config.json" in container["args"]  # KServe mounts storageUri at /mnt/models
    assert container["image"].startswith("openvino/model_server:")


def test_the_exported_model_loads_as_the_llm_calculator_loads_it(repository, demo_model):
    """The graph's options, given to GenAI's ContinuousBatchingPipeline as OVMS's LLM calculator
    gives them (its models_path relative to the graph, its device and plugin_config, its scheduler)."""
    import openvino_genai

    folder = repository / demo_model.name
    options = graph_options((folder / "graph.pbtxt").read_text())
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs = options["max_num_seqs"]
    scheduler.max_num_batched_tokens = options["max_num_batched_tokens"]
    scheduler.cache_size = options["cache_size"]
    scheduler.enable_prefix_caching = options["enable_prefix_caching"]
    scheduler.dynamic_split_fuse = options["dynamic_split_fuse"]
    plugin = json.loads(options.get("plugin_config", "{}"))
    pipe = openvino_genai.ContinuousBatchingPipeline(str((folder / options["models_path"]).resolve()), scheduler,
                                                     options["device"], plugin)
    config = pipe.get_config()
    config.max_new_tokens = 24
    tokenizer = pipe.get_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    result = pipe.generate([prompt], [config])[0]
    assert "Paris" in result.m_generation_ids[0]


def test_export_refuses_what_it_cannot_write(repository, demo_model, tmp_path, demo_gguf):  # noqa: F811
    one_line_error(run_ovchat("export", demo_model.name, str(repository), "--ovms"), "already exists")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    one_line_error(run_ovchat("export", demo_model.name, str(mine), "--ovms", "--force"), "not a repository ovchat")
    assert (mine / "notes.txt").read_text() == "keep me"
    one_line_error(run_ovchat("export", str(demo_gguf), str(tmp_path / "g"), "--ovms"), "not a converted model")
    assert run_ovchat("export", demo_model.name, str(repository), "--ovms", "--force").returncode == 0
    assert run_ovchat("export", demo_model.name, str(tmp_path / "x")).returncode == 2  # --ovms is required


def test_the_repository_passes_ovms_own_protos_and_config_schema(repository):
    """The strict check, where OVMS's and MediaPipe's sources are at hand (they are on no package
    index, so CI skips it): scripts/check_ovms_graphs.py compiles their protos with grpcio-tools'
    protoc and parses every graph, and validates config.json with OVMS's own config schema. Set
    OVCHAT_OVMS_SRC and OVCHAT_MEDIAPIPE_SRC to checkouts of
    openvinotoolkit/model_server and google-ai-edge/mediapipe, and OVCHAT_PROTOC_PYTHON to a
    Python with grpcio-tools."""
    import os
    import subprocess
    from pathlib import Path

    needed = ("OVCHAT_OVMS_SRC", "OVCHAT_MEDIAPIPE_SRC", "OVCHAT_PROTOC_PYTHON")
    if not all(os.environ.get(v) for v in needed):
        pytest.skip(f"set {', '.join(needed)} to parse the graphs with OVMS's own protos")
    script = Path(__file__).resolve().parent.parent / "scripts" / "check_ovms_graphs.py"
    done = subprocess.run([os.environ["OVCHAT_PROTOC_PYTHON"], str(script), str(repository), "--ovms-src",
                           os.environ["OVCHAT_OVMS_SRC"], "--mediapipe-src", os.environ["OVCHAT_MEDIAPIPE_SRC"]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("ok ") == 3, done.stdout + done.stderr  # config + 2 graphs


def test_a_draft_model_goes_beside_the_model_and_loads_as_ovms_loads_it(demo_model, tmp_path):
    """With --draft-model the graph names the draft's folder (draft_models_path, relative to the
    model's) and the pipeline loads with it as OVMS's calculator does (the draft on the same device)."""
    import openvino_genai

    root = tmp_path / "repo"
    done = run_ovchat("export", demo_model.name, str(root), "--ovms", "--draft-model", demo_model.name)
    assert done.returncode == 0, done.stderr
    folder = root / demo_model.name
    options = graph_options((folder / "graph.pbtxt").read_text())
    draft = folder / options["draft_models_path"]
    assert (draft / "openvino_model.xml").is_file()
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.max_num_seqs, scheduler.cache_size = options["max_num_seqs"], options["cache_size"]
    pipe = openvino_genai.ContinuousBatchingPipeline(
        str(folder), scheduler, options["device"], {"draft_model": openvino_genai.draft_model(str(draft), "CPU")})
    config = pipe.get_config()
    config.max_new_tokens, config.num_assistant_tokens = 16, 3
    prompt = pipe.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert "Paris" in pipe.generate([prompt], [config])[0].m_generation_ids[0]
    one_line_error(run_ovchat("export", demo_model.name, demo_model.name, str(tmp_path / "two"), "--ovms",
                              "--draft-model", demo_model.name), "exactly one")
