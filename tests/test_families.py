"""One registry of architectures (ovchat.convert.families): the builders, both readers, the CLI's
help and the README all agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ovchat.cli import main
from ovchat.convert.families import BY_GGUF, FAMILIES, family_of, gguf_family
from ovchat.errors import UnsupportedArchitectureError

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_has_its_builder_and_every_builder_a_family():
    builders = {p.stem for p in (ROOT / "ovchat" / "convert" / "models").glob("*.py") if p.stem != "__init__"}
    # mistral reuses llama's wiring as a module of its own; every module is some family's builder.
    assert {f.module for f in FAMILIES} == builders


def test_configs_and_gguf_architectures_find_their_family():
    for family in FAMILIES:
        for arch in family.architectures:
            assert family_of({"architectures": [arch]}) is family
        for model_type in family.model_types:
            assert family_of({"model_type": model_type}) is family
        if family.gguf:
            assert gguf_family(family.gguf) is family
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM is not supported; ovchat converts LlamaForCausalLM"):
        family_of({"architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'"):
        gguf_family("falcon")
    # llama.cpp's architecture names are the modules' names (nomic-bert spelt with a hyphen).
    assert {arch.replace("-", "_") for arch in BY_GGUF} <= {f.module for f in FAMILIES}


def test_the_cli_help_and_the_readme_list_the_registry():
    help_text = " ".join(CliRunner().invoke(main, ["convert", "--help"]).output.split())
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"Architectures, one file each under `ovchat/convert/models/`:(.*?)Anything\s+else",
                       readme, re.S).group(1)
    assert set(re.findall(r"`(\w+)`", listed)) == {f.module for f in FAMILIES}
    for family in FAMILIES:
        assert family.module in help_text
