"""Which of dino_rs's distributions is installed: ``dino-rs`` (CPU) or ``dino-rs-cu13`` (CUDA 13).

Both install the import package ``dino_rs``. pip has no way to declare that two distributions
conflict, so installing one beside the other lets the second overwrite the first's files, and
uninstalling either then breaks the other. This is found at import and explained.
"""

from __future__ import annotations

import warnings
from importlib import metadata
from typing import Iterable, List, Optional

#: Every distribution that provides ``import dino_rs``.
DISTRIBUTIONS = ("dino-rs", "dino-rs-cu13")


def installed(path: Optional[Iterable[str]] = None) -> List[str]:
    """The names in :data:`DISTRIBUTIONS` that have metadata on ``path`` (default ``sys.path``)."""
    where = {} if path is None else {"path": list(path)}
    # Both spellings: Python 3.9's lookup does not normalise "-" to the "_" of the folder names.
    return [name for name in DISTRIBUTIONS
            if any(next(iter(metadata.distributions(name=n, **where)), None) is not None
                   for n in (name, name.replace("-", "_")))]


def warn_if_both(active_build: str, path: Optional[Iterable[str]] = None) -> Optional[str]:
    """Warns (RuntimeWarning) and returns the message when more than one distribution of dino_rs is
    installed; ``active_build`` is ``build_info()["build"]`` of the extension that was imported."""
    found = installed(path)
    if len(found) < 2:
        return None
    keep = "dino-rs-cu13" if active_build == "cuda" else "dino-rs"
    msg = (
        f"both {' and '.join(found)} are installed. They share the import name dino_rs, so the one "
        f"installed last replaced the other's files (the extension loaded now is the {active_build} "
        f"build), and uninstalling either breaks the other. Keep one: "
        f"pip uninstall -y {' '.join(found)} && pip install {keep}"
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return msg
