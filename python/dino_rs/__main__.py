"""Command line: ``python -m dino_rs train | embed | demo`` (also installed as ``dino-rs``).

The commands live in :mod:`dino_rs.cli`; ``demo`` is registered by ``cli.add_demo_command`` and run
by ``cli.run_demo``.
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
