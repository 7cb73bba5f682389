"""What goes beside every figure: the project's commit and JSON-safe hyper-parameters."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str:
    """The project's git commit (``-dirty`` with uncommitted changes; ``unknown`` outside a checkout)."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plain(value: Any) -> Any:
    """``value`` with every leaf a JSON type (others become their ``str``)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
