"""Check an `ovchat export --ovms` repository with OVMS's and MediaPipe's own definitions.

    python scripts/check_ovms_graphs.py REPOSITORY --ovms-src MODEL_SERVER --mediapipe-src MEDIAPIPE

MODEL_SERVER is a checkout of openvinotoolkit/model_server (its ``src/llm/llm_calculator.proto``),
MEDIAPIPE one of google-ai-edge/mediapipe (``mediapipe/framework/calculator.proto`` and what it
imports, and the SyncSetInputStreamHandler's options). Neither is shipped with ovchat nor on a
package index, so this runs where they can be fetched, in a venv with grpcio-tools (its protoc
and protobuf). Each ``graph.pbtxt`` is parsed with protobuf's text format into MediaPipe's
CalculatorGraphConfig, the LLM node's options are unpacked as OVMS's LLMCalculatorOptions (so a
misspelt field, a wrong type or an unknown enum value fails), and the required fields are
checked. ``config.json`` is validated with jsonschema against the schema OVMS validates it with
(``MODELS_CONFIG_SCHEMA``, read out of ``src/schema.cpp``: its C++ raw strings joined as the
compiler joins them). Prints one line per file; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

MEDIAPIPE_PROTOS = ["mediapipe/framework/" + name + ".proto" for name in (
    "calculator", "calculator_options", "mediapipe_options", "packet_factory", "packet_generator", "status_handler",
    "stream_handler", "stream_handler/sync_set_input_stream_handler")]
OVMS_PROTO = "src/llm/llm_calculator.proto"


def compile_protos(ovms_src: Path, mediapipe_src: Path, out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = out / "include"
    for name in MEDIAPIPE_PROTOS:
        (include / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mediapipe_src / name, include / name)
    (include / "ovms").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ovms_src / OVMS_PROTO, include / "ovms" / "llm_calculator.proto")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = MEDIAPIPE_PROTOS + ["ovms/llm_calculator.proto"]
    code = protoc.main(["protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}", *files])
    if code != 0:
        raise SystemExit(f"protoc failed ({code}) on {', '.join(files)}")


def ovms_config_schema(schema_cpp: str, name: str = "MODELS_CONFIG_SCHEMA") -> dict:
    """The JSON schema ``name`` of OVMS's src/schema.cpp: a C++ expression of raw string literals
    and other such constants joined by ``+`` (preprocessor lines skipped: MediaPipe enabled)."""
    constants: dict = {}
    for match in re.finditer(r"const (?:std::string|char\*) (\w+) = ", schema_cpp):
        pieces, pos = [], match.end()
        while True:
            while schema_cpp[pos] in " \t\r\n+":
                pos += 1
            if schema_cpp.startswith('R"(', pos):
                end = schema_cpp.index(')"', pos + 3)
                pieces.append(schema_cpp[pos + 3:end])
                pos = end + 2
            elif schema_cpp[pos] == "#":
                pos = schema_cpp.index("\n", pos)
            elif schema_cpp[pos] == ";":
                break
            else:
                ident = re.match(r"\w+", schema_cpp[pos:]).group(0)
                pieces.append(constants[ident])
                pos += len(ident)
        constants[match.group(1)] = "".join(pieces)
    return json.loads(constants[name])


def check_config(repository: Path, ovms_src: Path) -> list:
    import jsonschema

    schema = ovms_config_schema((ovms_src / "src" / "schema.cpp").read_text())
    try:
        jsonschema.validate(json.loads((repository / "config.json").read_text()), schema)
    except jsonschema.ValidationError as e:
        return [e.message]
    return []


def check_graph(path: Path, modules: dict) -> list:
    from google.protobuf import text_format

    graph = modules["calculator"].CalculatorGraphConfig()
    text_format.Parse(path.read_text(), graph)  # unknown fields, wrong types: ParseError
    problems = []
    nodes = [n for n in graph.node if n.calculator == "HttpLLMCalculator"]
    if len(nodes) != 1:
        return [f"{len(nodes)} HttpLLMCalculator nodes"]
    node = nodes[0]
    if "LLM_NODE_RESOURCES:llm" not in node.input_side_packet:
        problems.append("no LLM_NODE_RESOURCES:llm side packet")
    if not any(info.tag_index == "LOOPBACK:0" and info.back_edge for info in node.input_stream_info):
        problems.append("no LOOPBACK back edge")
    if node.input_stream_handler.input_stream_handler != "SyncSetInputStreamHandler":
        problems.append("not the SyncSetInputStreamHandler")
    options = modules["llm_calculator"].LLMCalculatorOptions()
    packed = [o for o in node.node_options if o.type_url.endswith("mediapipe.LLMCalculatorOptions")]
    if len(packed) != 1 or not packed[0].Unpack(options):
        return problems + ["no LLMCalculatorOptions"]
    if not options.IsInitialized():
        problems.append(f"LLMCalculatorOptions lacks {options.FindInitializationErrors()}")
    if options.plugin_config:
        json.loads(options.plugin_config)  # OVMS parses it as JSON
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--ovms-src", type=Path, required=True)
    parser.add_argument("--mediapipe-src", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        compile_protos(args.ovms_src, args.mediapipe_src, out)
        sys.path.insert(0, str(out))
        modules = {"calculator": importlib.import_module("mediapipe.framework.calculator_pb2"),
                   "llm_calculator": importlib.import_module("ovms.llm_calculator_pb2")}
        importlib.import_module("mediapipe.framework.stream_handler.sync_set_input_stream_handler_pb2")
        from google.protobuf import text_format

        problems = check_config(args.repository, args.ovms_src)
        failed = bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {args.repository / 'config.json'}" +
              (f": {'; '.join(problems)}" if problems else ""))
        for graph in sorted(args.repository.glob("*/graph.pbtxt")):
            try:
                problems = check_graph(graph, modules)
            except (text_format.ParseError, ValueError) as e:  # a field OVMS does not define, a bad value
                problems = [f"{type(e).__name__}: {e}"]
            failed |= bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {graph}" + (f": {'; '.join(problems)}" if problems else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
