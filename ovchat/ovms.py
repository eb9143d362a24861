"""Stored models as an OpenVINO Model Server repository: for deployments that outgrow one box.

A converted model directory is already what OVMS's LLM servable loads (GenAI's
ContinuousBatchingPipeline over the IR and the tokenizer IRs). What OVMS needs besides is a
MediaPipe graph per model (``graph.pbtxt``: the ``HttpLLMCalculator`` node and its
``LLMCalculatorOptions``), the chat template where its template engine looks for it
(``tokenizer_config.json``, ``chat_template.jinja``), and a ``config.json`` that lists the models.
The formats follow OVMS 2026.x (``src/llm/llm_calculator.proto``, ``src/graph_export/
graph_export.cpp``, ``src/schema.cpp``, ``docs/llm/reference.md``, ``extras/kserve/``); for
Kubernetes, a KServe ``ServingRuntime`` and ``InferenceService`` for the repository.

What ovchat knows goes into the options: the model's runtime options as ``plugin_config``, the
scheduler as ``ovchat serve`` runs it (prefix caching, a KV cache that grows, the batch bounds),
and the tool and reasoning parsers of the model's family, read from its chat template as ovchat's
own parser does.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

from ovchat.errors import InputError, StorageError
from ovchat.modelfiles import MANIFEST, MODEL_BIN, MODEL_XML, TOKENIZER_FILES, read_manifest

OVMS_IMAGE = "openvino/model_server:2026.0"
# Files of a store model that OVMS reads (the IR and tokenizer IRs, and the configs GenAI reads).
_COPIED = tuple(dict.fromkeys((MODEL_XML, MODEL_BIN, *TOKENIZER_FILES, "openvino_detokenizer.xml",
                               "openvino_detokenizer.bin", "config.json", "generation_config.json",
                               "special_tokens_map.json")))
# ovchat's tool-call formats (toolcalls._MARKERS) -> the OVMS tool_parser that reads the same.
TOOL_PARSERS = {"<tool_call>": "hermes3", "[TOOL_CALLS]": "mistral", "functools[": "phi4", "<|tool_call|>": "phi4",
                "<|python_tag|>": "llama3"}


@dataclass
class ServingSettings:
    """The scheduler and device of every exported model (``ovchat serve``'s defaults)."""

    device: str = "CPU"
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 64
    cache_size_gb: int = 0  # 0: the KV cache grows with the work
    enable_prefix_caching: bool = True
    extra_plugin_config: Dict[str, str] = field(default_factory=dict)
    draft: Optional[Path] = None  # a smaller model of the same tokenizer for speculative decoding


@dataclass
class Exported:
    """What ``export`` wrote: the repository, each model's folder, the KServe manifest."""

    root: Path
    models: Dict[str, Path]
    kserve: Path

    def docker_command(self, port: int = 8000) -> str:
        return (f"docker run --rm -p {port}:{port} -v {self.root}:/models:ro {OVMS_IMAGE} "
                f"--rest_port {port} --config_path /models/config.json")


def parsers(template: str) -> Dict[str, str]:
    """The OVMS tool and reasoning parsers for a chat template (none for a template without
    tools or thinking tags)."""
    found: Dict[str, str] = {}
    for marker, name in TOOL_PARSERS.items():
        if marker in template:
            found["tool_parser"] = name
            break
    if "<think>" in template:
        found["reasoning_parser"] = "qwen3"
    return found


DRAFT_DIR = "draft"  # the draft model's folder inside the model's, as OVMS's graph export names it


def graph(manifest: dict, template: str, settings: ServingSettings) -> str:
    """The model's graph.pbtxt: OVMS's text-generation graph with ovchat's options."""
    plugin = {**(manifest.get("runtime_options") or {}), **settings.extra_plugin_config}
    options = [("models_path", "./"), ("device", settings.device),
               ("max_num_seqs", settings.max_num_seqs), ("max_num_batched_tokens", settings.max_num_batched_tokens),
               ("cache_size", settings.cache_size_gb), ("enable_prefix_caching", settings.enable_prefix_caching),
               ("dynamic_split_fuse", True)]
    if plugin:
        options.append(("plugin_config", json.dumps(plugin, sort_keys=True)))
    options += sorted(parsers(template).items())
    if settings.draft is not None:
        options.append(("draft_models_path", DRAFT_DIR))
    body = "\n".join(f"        {key}: {_value(value)}" for key, value in options)
    name = (manifest.get("store") or {}).get("name") or "the model"
    return f"""# OpenVINO Model Server graph of {name}, written by ovchat export
input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"
node: {{
  name: "LLMExecutor"
  calculator: "HttpLLMCalculator"
  input_stream: "LOOPBACK:loopback"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "LLM_NODE_RESOURCES:llm"
  input_side_packet: "LLM_NODE_EXECUTION_CONTEXTS:llm_ctx"
  output_stream: "LOOPBACK:loopback"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  input_stream_info: {{
    tag_index: "LOOPBACK:0"
    back_edge: true
  }}
  node_options: {{
    [type.googleapis.com/mediapipe.LLMCalculatorOptions]: {{
{body}
    }}
  }}
  input_stream_handler {{
    input_stream_handler: "SyncSetInputStreamHandler"
    options {{
      [mediapipe.SyncSetInputStreamHandlerOptions.ext] {{
        sync_set {{
          tag_index: "LOOPBACK:0"
        }}
      }}
    }}
  }}
}}
"""


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a protobuf text-format string: JSON's escapes are a subset it reads


def kserve(names: Sequence[str], storage_uri: str, settings: ServingSettings) -> str:
    """A KServe ServingRuntime for OVMS over a model repository, and an InferenceService that
    serves the repository from ``storage_uri`` (copy the exported folder there)."""
    return f"""# KServe manifests for the OVMS repository written by ovchat export ({', '.join(names)}).
# Copy the repository to {storage_uri}, then: kubectl apply -f kserve.yaml
apiVersion: serving.kserve.io/v1alpha1
kind: ServingRuntime
metadata:
  name: ovchat-ovms
spec:
  annotations:
    prometheus.kserve.io/path: /metrics
    prometheus.kserve.io/port: "8080"
  supportedModelFormats:
  - name: ovms-repository
    version: "1"
    autoSelect: true
  protocolVersions:
  - v1
  - v2
  containers:
  - name: kserve-container
    image: {OVMS_IMAGE}
    args:
    - --config_path=/mnt/models/config.json
    - --rest_port=8080
    - --port=9000
    - --file_system_poll_wait_seconds=0
    ports:
    - containerPort: 8080
      name: rest
      protocol: TCP
    startupProbe:
      periodSeconds: 5
      failureThreshold: 360
      httpGet:
        path: /v2/health/ready
        port: rest
    securityContext:
      allowPrivilegeEscalation: false
      runAsNonRoot: true
      runAsUser: 5000
      capabilities:
        drop:
        - ALL
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: ovchat
spec:
  predictor:
    minReplicas: 1
    maxReplicas: 4
    model:
      modelFormat:
        name: ovms-repository
      runtime: ovchat-ovms
      storageUri: {storage_uri}
      resources:
        requests:
          cpu: "{max(2, settings.max_num_seqs)}"
          memory: 4Gi
        limits:
          memory: 8Gi
"""


def export(models: Sequence[Path], root: Path, *, settings: Optional[ServingSettings] = None,
           storage_uri: str = "pvc://ovchat-models/", force: bool = False) -> Exported:
    """Write an OVMS repository for converted chat ``models`` (store directories) into ``root``.

    ``root`` must not exist (or, with ``force``, be a repository ovchat exported before): the
    model files are hard-linked where the file system allows, copied otherwise."""
    from ovchat.store import chat_template

    settings = settings or ServingSettings()
    root = Path(root).expanduser().absolute()
    if settings.draft is not None and len(models) != 1:
        raise InputError("--draft-model speeds up one model: export exactly one with it")
    if settings.draft is not None and not (Path(settings.draft) / MANIFEST).is_file():
        raise InputError(f"{settings.draft} is not a converted model; the draft must be one of the store")
    if root.exists():
        if not force:
            raise InputError(f"{root} already exists; choose another folder, or pass --force to replace an "
                             "export ovchat wrote there")
        if not (root / ".ovchat-export").is_file():
            raise InputError(f"{root} is not a repository ovchat exported; it is left as it is")
    seen: Dict[str, Path] = {}
    for model in models:
        model = Path(model)
        if model.is_file() or not (model / MANIFEST).is_file():
            raise InputError(f"{model} is not a converted model; export takes models of the store "
                             "(ovchat pull NAME converts one)")
        manifest = read_manifest(model)
        if manifest.get("kind", "chat") != "chat":
            raise InputError(f"{model.name} is an embedding model; export writes chat models only")
        name = (manifest.get("store") or {}).get("name") or model.name
        if name in seen:
            raise InputError(f"two models would both be called {name}")
        seen[name] = model
    work = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir(parents=True)
        written = {}
        for name, model in seen.items():
            target = work / name
            target.mkdir()
            for file in _COPIED:
                if (model / file).is_file():
                    _link_or_copy(model / file, target / file)
            template = chat_template(model)
            if template:
                settings_file = model / "tokenizer_config.json"
                tokenizer_config = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
                tokenizer_config["chat_template"] = template
                (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
                (target / "chat_template.jinja").write_text(template)
            if settings.draft is not None:
                (target / DRAFT_DIR).mkdir()
                for file in _COPIED:
                    if (Path(settings.draft) / file).is_file():
                        _link_or_copy(Path(settings.draft) / file, target / DRAFT_DIR / file)
            (target / "graph.pbtxt").write_text(graph(read_manifest(model), template, settings))
            written[name] = root / name
        config = {"model_config_list": [{"config": {"name": name, "base_path": name}} for name in seen]}
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (work / "kserve.yaml").write_text(kserve(list(seen), storage_uri, settings))
        (work / ".ovchat-export").write_text("an OpenVINO Model Server repository written by ovchat export\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(work, root)
    except OSError as e:
        raise StorageError(f"could not write the repository at {root} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Exported(root, written, root / "kserve.yaml")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)

