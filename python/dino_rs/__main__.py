"""Command line: ``python -m dino_rs demo`` (also installed as ``dino-rs``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-rs", description="DINO self-supervised learning in Rust.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="multi-crop views of the bundled photos (or --images) as a PNG grid")
    demo.add_argument("--output", default="dino_rs_views.png", help="PNG file to write")
    demo.add_argument("--images", nargs="*", help="image files to use instead of the bundled photos")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from . import demo as demo_mod
    from ._errors import ImageError

    try:
        demo_mod.run(args.output, args.images, args.seed)
    except (ImageError, OSError, ValueError) as e:
        print(f"dino-rs: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
