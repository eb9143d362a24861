#!/usr/bin/env python
"""Convert a checkpoint to an OpenVINO model: exactly `ovchat convert`, for those who prefer a script.

    python scripts/convert_model.py SOURCE OUTPUT [--weight-format int4|int8|fp16] [--sym/--asym]
        [--group-size N] [--ratio R] [--group-size-fallback adjust|ignore|error] [--force]

A thin wrapper: the logic lives in ovchat.convert.convert(), the options in ovchat.cli.
"""

import sys

from ovchat.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]], prog_name="convert_model.py")
