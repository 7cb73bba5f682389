"""Silence the messages a user of ``s2ap`` cannot act on, each with the reason it is noise here.

Called by the entry points (the CLI and the jobs), never on import, so code that only imports the
library keeps every warning.
"""

from __future__ import annotations

import logging
import warnings

#: (message pattern, why it is noise for this project)
NOISE = (
    (
        r".*overridden `on_after_batch_transfer`.*",
        "intended: the stage's hook moves batches to channels_last; the DataModule has none",
    ),
    (
        r".*Checkpoint directory .* exists and is not empty.*",
        "`s2ap fit` and `s2ap demo` refuse a folder that holds a run; left are resumes, --overwrite "
        "and the study's own cells (each resumed or rerun on purpose)",
    ),
    (
        r".*The dirpath has changed from.*",
        "at test time no checkpoint is written, so the callback's old folder does not matter",
    ),
    (
        r".*`tensorboardX` has been removed as a dependency.*",
        "the CSV logger it falls back to is the logger this project uses",
    ),
    (r".*LeafSpec.*", "a deprecation inside Lightning's own code"),
    (
        r".*manual optimization and every_n_train_steps.*",
        "the stages step once per batch, and a step checkpoint counts that batch as processed: the "
        "state after the step is the one an exact resume needs",
    ),
)


class _DropTips(logging.Filter):
    """Lightning's advertisement for a cloud logger on every run: nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def silence_known_noise() -> None:
    for pattern, _reason in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
