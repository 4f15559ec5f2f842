"""Write the example storyboards in ``storyboards/`` from shape-world scripts (see slotgen/train/storyboards.py).

Run: ``python scripts/write_storyboards.py [--out storyboards]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slotgen.train.storyboards import write_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="storyboards", help="folder for the YAML files (default: storyboards)")
    for path in write_all(Path(parser.parse_args(argv).out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
