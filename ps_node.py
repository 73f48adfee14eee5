#!/usr/bin/env python3
"""Run one node of a byzps job: see `python ps_node.py --help` and README.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from byzps.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
