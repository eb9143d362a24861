#!/usr/bin/env python
"""Convert a checkpoint to an OpenVINO model: the same command as `ovchat convert`.

    python scripts/convert_model.py SOURCE OUTPUT [--weight-format int4|int8|fp16] [--sym/--asym]
        [--group-size N] [--ratio R] [--group-size-fallback adjust|ignore|error] [--force]

A thin wrapper: all logic lives in ovchat.convert.convert(), all options in ovchat.cli_convert.
"""

from ovchat.cli_convert import convert_cmd

if __name__ == "__main__":
    convert_cmd(prog_name="convert_model.py")
