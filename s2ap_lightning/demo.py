"""Gone: the demo is :func:`s2ap_lightning.jobs.demo.run_demo`, a study preset.

``from s2ap_lightning.demo import ...`` (the notebook's import before the demo ran the study's cells)
fails with an ImportError that names the new place instead of a bare "no module named".
"""

from __future__ import annotations

from typing import NoReturn


def __getattr__(name: str) -> NoReturn:
    raise ImportError(
        f"s2ap_lightning.demo.{name} is gone: the demo is s2ap_lightning.jobs.demo.run_demo(out=..., "
        "sparsities=..., ...) (the old DemoConfig fields are its arguments; it returns ResultRow objects, "
        "formatted by s2ap_lightning.jobs.demo.format_table)"
    )
