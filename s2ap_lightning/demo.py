"""Kept for ``from s2ap_lightning.demo import ...``: the demo lives in :mod:`s2ap_lightning.jobs.demo`."""

from s2ap_lightning.jobs.demo import COLUMNS, DemoConfig, format_table, main, run_demo, write_results

__all__ = ["COLUMNS", "DemoConfig", "format_table", "main", "run_demo", "write_results"]
