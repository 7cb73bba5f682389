"""The ``s2ap`` command: LightningCLI for ``fit | validate | test``, plus the project's tools.

Examples:
    s2ap fit --config configs/data/digits.yaml --config configs/stages/pretrain.yaml
    s2ap export runs/digits/finetune/best.ckpt --out pruned.pt
    s2ap demo

"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from s2ap_lightning.checkpoint import CheckpointError, load_file, require_writable
from s2ap_lightning.data import RobustDataModule
from s2ap_lightning.pruning.methods import method_from_config
from s2ap_lightning.stages import RobustTask
from s2ap_lightning.stages.callbacks import (
    BEST,
    LAST,
    BestCheckpoint,
    StepCheckpoint,
    latest_hpc_checkpoint,
    slurm_job_id,
)
from s2ap_lightning.stages.hparams import plain_value, upgrade_checkpoint_hparams


class S2APCLI(LightningCLI):
    """Links what the data knows into the model and keeps the best checkpoint by robust accuracy."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")

        # best.ckpt by validation robust accuracy, and last.ckpt for `--ckpt_path` resume.
        parser.add_lightning_class_args(BestCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in BEST.items()})
        parser.set_defaults({f"last_checkpoint.{k}": v for k, v in LAST.items()})
        parser.link_arguments("checkpoint.dirpath", "last_checkpoint.dirpath")
        # last.ckpt every N steps as well (--step_checkpoint.every_n_train_steps N; off by default).
        parser.add_lightning_class_args(StepCheckpoint, "step_checkpoint")
        parser.link_arguments("checkpoint.dirpath", "step_checkpoint.dirpath")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="let `fit` write into a checkpoint folder that holds another run's checkpoints",
        )

    def __init__(self, *args: Any, args_list: list[str] | None = None, **kwargs: Any) -> None:
        self._raw_args = list(sys.argv[1:] if args_list is None else args_list)
        super().__init__(*args, args=args_list, **kwargs)

    def _given(self, key: str, configs: bool = True) -> bool:
        """Whether the command sets ``model.<key>`` (or a field of it): option, or a ``--config`` file."""
        options = (f"--model.{key}", f"--model.init_args.{key}")
        raw = self._raw_args
        if any(a.split("=", 1)[0] in options or a.startswith(tuple(o + "." for o in options)) for a in raw):
            return True
        if not configs:
            return False
        files = [b for a, b in zip(raw, raw[1:], strict=False) if a in ("--config", "-c")]
        files += [a.split("=", 1)[1] for a in raw if a.startswith("--config=")]
        for name in files:
            try:
                config = yaml.safe_load(Path(name).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and (key in model or key in (model.get("init_args") or {})):
                return True
        return False

    def before_instantiate_classes(self) -> None:
        # Logs, per-epoch masks and the saved config go beside the run's checkpoints, not into
        # ./lightning_logs of whatever folder the command was started from.
        sub = self.config.get("subcommand")
        if not sub:
            return
        dirpath = self.config.get(f"{sub}.checkpoint.dirpath")
        if dirpath and not self.config.get(f"{sub}.trainer.default_root_dir"):
            self.config[f"{sub}.trainer.default_root_dir"] = dirpath

    #: ``--ckpt_path`` values that name no file (Lightning resolves them itself).
    SPECIAL_CKPT = ("last", "best", "hpc", "registry")

    def _parse_ckpt_path(self) -> None:
        """Merge a checkpoint's hyper-parameters into the command's config, keeping what it says.

        The one private LightningCLI member this project overrides: a documented seam, pinned to the
        Lightning range in pyproject.toml and tested (tests/test_cli.py: the seam still exists and is
        still called). LightningCLI replaces the model's arguments by the checkpoint's when
        ``--ckpt_path`` names a file; here, in addition:

        - the file is read once, with weights_only=True, and a missing, truncated or code-needing
          file fails in one line naming it;
        - a checkpoint written before the typed blocks has its flat options mapped into them
          (:func:`~s2ap_lightning.stages.hparams.upgrade_checkpoint_hparams`);
        - ``fit`` refuses to resume under changed run-defining settings (:meth:`_refuse_changed_run`);
        - ``test``/``validate`` keep the command's ``evaluation`` block, and its ``threat`` only when
          the command names one: the class defaults (8/255) must not replace the threat model a
          model was trained and selected at.
        """
        sub = self.config.get("subcommand")
        path = self.config.get(f"{sub}.ckpt_path") if sub else None
        saved = None
        if path and path not in self.SPECIAL_CKPT:
            saved = load_file(path)
        elif sub == "fit" and path == "last":
            dirpath = self.config.get("fit.checkpoint.dirpath")
            last = Path(dirpath) / "last.ckpt" if dirpath else None
            saved = load_file(last) if last is not None and last.is_file() else None
        if sub == "fit" and isinstance(saved, dict) and not self.config.get("fit.overwrite"):
            # A named file's settings replace the command's (below); `last` runs with the command's.
            self._refuse_changed_run(saved, merged=path != "last")
        elif sub in ("test", "validate") and isinstance(saved, dict):
            # The command names another mask or model than the checkpoint's: refused, not dropped.
            self._refuse_changed_run(saved, merged=True, keys=self.MODEL_KEYS)
        if path in self.SPECIAL_CKPT or not isinstance(saved, dict):
            return
        hparams = upgrade_checkpoint_hparams(saved.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        command = self.config.get(f"{sub}.model.init_args")
        keep = {}
        if sub in ("test", "validate") and command is not None:
            keep["evaluation"] = command.get("evaluation")
            if self._given("threat"):
                keep["threat"] = command.get("threat")
        # As typed options (a checkpoint written from Python has no class path: the command's stays).
        class_path = hparams.pop("_class_path", None) or self.config.get(f"{sub}.model.class_path")
        model = {"class_path": class_path, "init_args": hparams}
        self.config = self.parser.parse_object({sub: {"model": model}}, self.config)
        for key, value in keep.items():
            if value is not None:
                self.config[f"{sub}.model.init_args.{key}"] = value

    #: Settings that define a run: resuming it under other values would silently make it another run.
    RUN_KEYS = ("model", "sparsity", "gamma", "method", "robust_loss", "beta", "threat")

    #: Settings that define the evaluated network (``test``/``validate``): the threat model may differ.
    MODEL_KEYS = ("model", "sparsity", "method")

    def _refuse_changed_run(
        self, saved: dict[str, Any], merged: bool, keys: tuple[str, ...] | None = None
    ) -> None:
        """Resuming with settings that define the run changed is refused, naming old and new values.

        With a named checkpoint file LightningCLI replaces the command's model settings by the
        checkpoint's, so only what the command sets explicitly can conflict (and would be dropped
        silently); with ``last`` the command's settings are the ones that run, so all are compared.
        The seed fixes the data order and the attacks' random starts, at any point of an epoch.
        """
        old_hp = upgrade_checkpoint_hparams(saved.get("hyper_parameters") or {})
        sub = self.config.get("subcommand")
        init_args = self.config.get(f"{sub}.model.init_args")
        new_hp = plain_value(init_args) or {}
        for hp in (old_hp, new_hp):
            if "method" in hp:  # one form for both sides: None is the default method, HYDRA
                hp["method"] = method_from_config(hp["method"] or "hydra").config()
        changed = [
            f"{key}: {old_hp[key]!r} -> {new_hp[key]!r}"
            for key in keys or self.RUN_KEYS
            if key in old_hp
            and key in new_hp
            and old_hp[key] != new_hp[key]
            # test/validate: only options typed on the command line; a stage config's template
            # values (sparsity: 0.9 in configs/stages/s2ap.yaml) give way to the checkpoint's.
            and (not merged or self._given(key, configs=sub == "fit"))
        ]
        if sub != "fit":
            if changed:
                raise ValueError(
                    f"the command names another network than the checkpoint holds ({'; '.join(changed)}): "
                    "drop those options to evaluate the checkpoint as it was searched and trained"
                )
            return
        loader = (
            ((saved.get("loops") or {}).get("fit_loop") or {}).get("state_dict", {}).get("combined_loader")
        )
        old_seed = loader[0].get("seed") if isinstance(loader, list) and loader and loader[0] else None
        new_seed = self.config.get("fit.seed_everything")
        if new_seed is None or new_seed is False:
            new_seed = 0  # no seeding: the training sampler's order uses seed 0
        if old_seed is not None and new_seed is True:
            changed.append(f"seed_everything: {old_seed} -> true (a new random seed)")
        elif old_seed is not None and new_seed != old_seed:
            changed.append(f"seed_everything: {old_seed} -> {new_seed}")
        if changed:
            raise ValueError(
                f"resuming a run with settings that define it changed ({'; '.join(changed)}): that would "
                "be another run under the old one's name. Resume with the old values, start a new run in "
                "another --checkpoint.dirpath, or pass --overwrite true"
            )

    def _preflight(self) -> None:
        # The data first: a split too small or a folder that cannot be read fails before any write.
        self.datamodule.setup(self.subcommand)
        sub = self.subcommand
        if sub in ("test", "validate") and not self.config.get(f"{sub}.ckpt_path"):
            if not self.model.hparams.get("init_from"):
                raise ValueError(
                    f"s2ap {sub} without --ckpt_path (or --model.init_from) would evaluate an untrained "
                    "network: pass the checkpoint to evaluate, e.g. --ckpt_path runs/finetune/best.ckpt"
                )
        self.model.preflight(self.trainer, sub, from_checkpoint=bool(self.config.get(f"{sub}.ckpt_path")))
        if self.subcommand == "fit":
            self._refuse_overwrite()
        self._require_writable_outputs()
        # `--ckpt_path` restores with weights_only=True unless the command says otherwise: a
        # checkpoint from someone else must not run code on load.
        kwargs = self.config_init[sub]
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True

    def _require_writable_outputs(self) -> None:
        """Every folder the command will write to is writable, checked before any training or evaluation.

        Otherwise a read-only folder fails only when the first checkpoint is saved or, for ``test``,
        when the record of an evaluation that may have taken hours is written.
        """
        sub = self.subcommand
        folders: dict[str, tuple[str, str]] = {}

        def add(folder: Any, what: str, remedy: str) -> None:
            if folder and "://" not in str(folder):  # remote storage (fsspec) is not probed
                folders[os.path.normpath(os.path.expanduser(str(folder)))] = (what, remedy)

        root = self.trainer.default_root_dir
        for logger in self.trainer.loggers:
            add(getattr(logger, "save_dir", None), "logs", "choose another --trainer.default_root_dir")
        if sub == "fit":
            # Also where a pre-empted SLURM job saves its hpc checkpoint.
            add(root, "checkpoints and logs", "choose another --trainer.default_root_dir")
            add(
                self.config.get("fit.checkpoint.dirpath"),
                "checkpoints and logs",
                "choose another --checkpoint.dirpath",
            )
        ckpt = self.config.get(f"{sub}.ckpt_path")
        if sub == "test" and ckpt and ckpt not in self.SPECIAL_CKPT:
            add(
                Path(ckpt).parent,
                "the evaluation record (written beside the checkpoint)",
                f"link the checkpoint into a writable folder (ln -s {Path(ckpt).resolve()} <folder>/) and "
                "pass the link as --ckpt_path",
            )
        elif sub == "test":  # the record goes beside the checkpoint Lightning finds, or into the run folder
            add(
                self.config.get("test.checkpoint.dirpath") or root,
                "the evaluation record",
                "choose another --checkpoint.dirpath",
            )
        for folder, (what, remedy) in folders.items():
            require_writable(folder, what, remedy)

    def _refuse_overwrite(self) -> None:
        """A new `fit` never replaces another run's checkpoints (a better best.ckpt lost for good)."""
        sub = self.subcommand
        dirpath = self.config.get(f"{sub}.checkpoint.dirpath")
        if not dirpath or self.config.get(f"{sub}.ckpt_path") or self.config.get(f"{sub}.overwrite"):
            return
        existing = sorted(p.name for p in Path(dirpath).glob("*.ckpt")) if Path(dirpath).is_dir() else []
        if existing and not self._requeued_run():
            raise FileExistsError(
                f"checkpoint.dirpath={dirpath!r} already holds a run ({', '.join(existing)}). Resume it "
                "with --ckpt_path last, write to a new --checkpoint.dirpath, or replace it with "
                "--overwrite true."
            )

    def _requeued_run(self) -> bool:
        """Whether Lightning is about to resume this same SLURM job from its own hpc checkpoint.

        A job requeued by :class:`~s2ap_lightning.stages.callbacks.SlurmRequeue` (or by Lightning's
        own handler) restarts with the same command and no ``--ckpt_path``; Lightning then resumes
        from the highest ``hpc_ckpt_<N>.ckpt`` in ``trainer.default_root_dir``. That is the same run,
        not a second one: recognised by the job id the checkpoint records (checkpoints without one,
        from Lightning's handler, count when SLURM says this job was restarted). Another job pointed
        at the same folder is still refused.
        """
        if not SLURMEnvironment.detect():
            return False
        hpc = latest_hpc_checkpoint(self.trainer.default_root_dir)
        if hpc is None:
            return False
        saved = load_file(hpc)
        recorded = saved.get("slurm_job_id") if isinstance(saved, dict) else None
        if recorded is not None:
            return recorded == slurm_job_id()
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0

    before_fit = before_validate = before_test = _preflight


def _demo(argv: list[str]) -> int:
    # Jobs and tools are imported on use, so `s2ap fit` does not load submitit, scipy or the analyses.
    # Both jobs parse through the tools' jsonargparse mechanism: a typed function or the spec dataclass.
    from s2ap_lightning.jobs.demo import run_demo
    from s2ap_lightning.tools import run_tool

    run_tool(run_demo, argv, "demo")
    return 0


def _study(argv: list[str]) -> int:
    from s2ap_lightning.jobs import study
    from s2ap_lightning.tools import run_tool

    study.run_study(run_tool(study.StudySpec, argv, "study"))
    return 0


def _tool(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from s2ap_lightning.tools import TOOLS as FUNCTIONS
        from s2ap_lightning.tools import run_tool

        return run_tool(FUNCTIONS[name], argv, name)

    return run


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "study": _study,
    **{
        name: _tool(name)
        for name in ("export", "hamming", "sharpness", "landscape", "security", "report", "pick")
    },
}


def run_cli(argv: list[str] | None = None, run: bool = True) -> S2APCLI:
    """LightningCLI over every stage (``--model RobustPretrainer | ScoreSpaceSAMPruner | ...``)."""
    return S2APCLI(
        RobustTask,
        RobustDataModule,
        args_list=argv,
        subclass_mode_model=True,
        # Checkpoints are written to a temporary file and renamed, so a crash mid-save keeps the last one.
        trainer_defaults={"plugins": [{"class_path": "s2ap_lightning.checkpoint.AtomicCheckpointIO"}]},
        run=run,
        save_config_kwargs={"overwrite": True},
        # Parse errors raise (main prints them in one line) instead of a usage text of 100 lines.
        parser_kwargs={
            "description": "s2ap: " + ", ".join(TOOLS) + " are further commands",
            "exit_on_error": False,
        },
    )


#: The project's own validation errors, checkpoints that cannot be read, outputs that cannot be
#: written: one readable line, no traceback (S2AP_DEBUG=1 shows it).
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    CheckpointError,
)

#: Lines of a jsonargparse error that only say where it looked, not what is wrong.
_PARSE_NOISE = re.compile(
    r"^(- )?(Parser key|Does not validate|Subtypes:|Errors:|Problem with given class_path|Given value|"
    r"Expected a <class 'NoneType'>)"
)


def parse_error_line(message: str) -> str:
    """The nested error of jsonargparse as one line: the option's dotted name and what is wrong with it."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    reasons = [line.strip() for line in message.splitlines() if line.strip()]
    reasons = [line for line in reasons if not _PARSE_NOISE.match(line)]
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reasons[0] if reasons else message.splitlines()[0])
    where = ".".join(dict.fromkeys(k for key in keys for k in key.split(".")))
    return f"--{where}: {reason}" if where else reason


def _state_dict_mismatch(err: RuntimeError) -> str | None:
    """Lightning's "Error(s) in loading state_dict" (another architecture or class count) in one line."""
    text = str(err)
    if "Error(s) in loading state_dict" not in text:
        return None
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    return (
        "the checkpoint does not fit the model built from this command (another architecture, input "
        f"size or number of classes?): {details[0] if details else text.splitlines()[0]}"
    )


def one_line(err: BaseException) -> str:
    """The message a user can act on, on one line.

    jsonargparse wraps a class's own ``ValueError`` in a list of union-type attempts and the whole
    namespace; only the project's message is kept.
    """
    cause = err
    while cause.__cause__ is not None:  # jsonargparse chains a nested block's own error as the cause
        cause = cause.__cause__
    if cause is not err and "Does not validate" not in str(cause) and str(cause).strip():
        return str(cause).strip().splitlines()[0]
    text = str(err)
    if "\nErrors:\n" in text:
        reasons = [
            line.strip()[2:]
            for line in text.split("\nErrors:\n", 1)[1].splitlines()
            if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line
        ]
        if reasons:
            return reasons[0]
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    from s2ap_lightning.quiet import silence_known_noise

    silence_known_noise()
    args = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("S2AP_DEBUG", "") not in ("", "0")
    try:
        if args and args[0] in TOOLS:
            return TOOLS[args[0]](args[1:])
        run_cli(None if argv is None else args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"s2ap: error: {one_line(err)}  (S2AP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except argparse.ArgumentError as err:
        if debug:
            raise
        command = " ".join(["s2ap", *args[:1]]) if args and not args[0].startswith("-") else "s2ap"
        print(
            f"s2ap: error: {parse_error_line(str(err))}  ({command} --help lists the options; "
            "S2AP_DEBUG=1 shows the details)",
            file=sys.stderr,
        )
        return 2
    except RuntimeError as err:
        # A study whose cells failed names them (the finished ones are kept): one line, like the rest.
        line = str(err).strip().splitlines()[0] if type(err).__name__ == "CellsFailed" else None
        line = line or _state_dict_mismatch(err)
        if debug or line is None:
            raise
        print(f"s2ap: error: {line}  (S2AP_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
