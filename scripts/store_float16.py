"""Store checkpoints' weights as float16 (half the bytes), keeping the trained weights' sha256 in their info.

    python scripts/store_float16.py src/dlmprobe/checkpoints/sudoku-diffusion-seed1 [...]

The shipped extra training seeds are stored this way to fit the 30 MB checkpoint budget; they load
into float32 models as before. MODELS.md gives the measured effect of the rounding on a float32
checkpoint (logit differences, argmax agreement, exact-solve rate).
"""

from __future__ import annotations

import argparse
import sys

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import store_half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders or shipped model names")
    args = parser.parse_args()
    for name in args.checkpoints:
        try:
            print(f"{store_half(name)}: weights stored as float16")
        except (DlmprobeInputError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
