"""CLI on public APIs: the one private LightningCLI member overridden is a tested seam; renamed
options name their successor.

The seam, ``_parse_ckpt_path``, is still what LightningCLI calls.

pyproject.toml pins Lightning below 2.7; this fails first if a Lightning release in that range stops
calling the method from ``LightningCLI.__init__`` or renames it, instead of ``--ckpt_path`` quietly
losing the command's evaluation settings and the mapping of older checkpoints.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import lightning
from lightning.pytorch.cli import LightningCLI

from s2ap_lightning.cli import S2APCLI

ROOT = Path(__file__).resolve().parents[1]


def test_lightning_still_calls_the_seam_from_its_constructor():
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)


def test_the_seam_is_the_only_private_lightning_member_overridden():
    ours = {name for name in vars(S2APCLI) if name.startswith("_") and not name.startswith("__")}
    lightning_private = {name for name in ours if hasattr(LightningCLI, name)}
    assert lightning_private == {"_parse_ckpt_path"}


def test_the_installed_lightning_is_in_the_pinned_range():
    pin = re.search(r'"lightning>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins lightning to a range"
    version = tuple(int(p) for p in lightning.__version__.split(".")[:2])
    low = tuple(int(p) for p in pin.group(1).split(".")[:2])
    high = tuple(int(p) for p in pin.group(2).split(".")[:2])
    assert low <= version < high


def test_a_renamed_tool_option_names_its_new_name(capsys):
    from s2ap_lightning.cli import main

    assert main(["sharpness", "missing.ckpt", "--gamma", "0.01"]) == 2
    assert "--gamma was renamed --rho" in capsys.readouterr().err


def test_the_tools_data_options_are_one_block_and_the_old_ones_name_it(capsys):
    from s2ap_lightning.cli import main

    assert main(["landscape", "missing.ckpt", "--images", "8"]) == 2
    assert "--images was renamed --subset.images" in capsys.readouterr().err
    assert main(["security", "missing.ckpt", "--subset.images", "8"]) == 2
    assert "missing.ckpt" in capsys.readouterr().err  # parsed: it fails on the file, not the option
