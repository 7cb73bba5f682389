"""``s2ap study``: does S2AP help? A paired, multi-seed comparison with the base method.

Fairness rules, enforced by how the grid is built:

* **Shared pretraining.** Per seed, ONE robust pretraining; every mask search of that seed (the base
  method and S2AP at every gamma) starts from it. Each search records the hash of the weights it
  started from, so the pairing can be checked.
* **Gamma on validation.** Per (seed, base method, sparsity) the S2AP gamma is the one whose searched
  mask has the best PGD accuracy on the validation split (``w_pretrained * M(s*)``); test data is
  never read before a gamma is chosen.
* **Identical finetuning.** The base method's mask and the chosen S2AP mask are finetuned with the same
  recipe, the same epochs, learning rate and seed; with several finetuning arms (plain, AWP) each arm
  finetunes both, and pairs are formed within an arm.
* **Collapsed models are named.** A finetuned model no better than its majority class is marked
  collapsed and its pair is left out of the paired reading (counted in ``study.md``).
* **One evaluation protocol.** Finetuned models are evaluated by :mod:`s2ap_lightning.evaluation`
  (clean, PGD, AutoAttack on a class-stratified sample, gradient-masking checks).

The grid is a set of *cells* (pretrain, search, finetune; :mod:`s2ap_lightning.jobs.cells`), each
writing one JSON file when it has finished. A killed study resumes: finished cells are skipped, a
half-written cell is redone from scratch. ``--launcher slurm`` submits one job per cell through
submitit, with SLURM dependencies pretrain -> search -> finetune; ``local`` runs the cells in order in
this process, or with ``workers: N`` in N worker processes at once (:func:`run_parallel`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any

from s2ap_lightning.checkpoint import atomic_file
from s2ap_lightning.jobs.cells import (
    Cell,
    StudyContext,
    StudySpec,
    cells_of,
    choose_gamma,
    depends_on,
    read_result,
    result_path,
    run_cell,
    save_spec,
)
from s2ap_lightning.jobs.study_report import write_study_report
from s2ap_lightning.quiet import silence_known_noise

__all__ = [
    "Cell",
    "StudySpec",
    "cells_of",
    "choose_gamma",
    "read_result",
    "result_path",
    "run_cell",
    "run_local",
    "run_parallel",
    "run_study",
    "run_submitit",
]


# ----------------------------------------------------------------------------- launchers
def _eta(durations: dict[str, list[float]], cells: list[Cell]) -> float | None:
    """Seconds left for ``cells``, from the mean wall time of the finished cells of each kind.

    A kind that has not run yet counts at the mean of all kinds; None before any cell has finished.
    """
    known = [d for v in durations.values() for d in v]
    if not known:
        return None
    fallback = sum(known) / len(known)
    mean = {k: sum(v) / len(v) for k, v in durations.items()}
    return sum(mean.get(c.kind, fallback) for c in cells)


def run_local(spec: StudySpec) -> None:
    """Every cell in order in this process; finished cells are skipped (resume)."""
    todo = [c for wave in cells_of(spec) for c in wave]
    pending = [c for c in todo if read_result(spec, c) is None]
    print(f"study {spec.name}: {len(todo)} cells, {len(todo) - len(pending)} already finished", flush=True)
    ctx = StudyContext(spec) if pending else None
    started, durations = time.time(), {}
    for i, cell in enumerate(pending):
        eta = _eta(durations, pending[i:])
        eta_text = "" if eta is None else f", about {eta / 60:.0f} min left"
        elapsed = (time.time() - started) / 60
        print(f"[cell {i + 1}/{len(pending)}] {cell.key}  (elapsed {elapsed:.1f} min{eta_text})", flush=True)
        result = run_cell(spec, cell, ctx)
        durations.setdefault(cell.kind, []).append(float(result["wall_s"]))


# ----------------------------------------------------------------------------- local worker processes
class CellsFailed(RuntimeError):
    """Cells of a parallel study failed; the finished ones are kept (run the study again to resume)."""


def worker_threads(spec: StudySpec) -> int:
    """Torch threads of each worker process: ``threads``, or the CPU cores shared out among the workers."""
    if spec.threads:
        return spec.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // spec.workers)


_WORKER: dict[str, Any] = {}  # in a worker process: its spec and its StudyContext (built on first use)


def _init_worker(spec_dict: dict[str, Any], threads: int) -> None:
    import threading

    import torch

    silence_known_noise()  # a spawned worker starts with Python's default filters, not the CLI's
    torch.set_num_threads(threads)
    _WORKER.update(spec=StudySpec(**spec_dict), ctx=None)
    parent = os.getppid()

    def exit_with_parent() -> None:
        # A launcher killed outright (SIGKILL, a lost SSH session) cannot stop its workers; without this
        # they would finish their cell unseen while a resumed study redoes the same cell in its folder.
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_cell(cell_dict: dict[str, Any]) -> float:
    """Run one cell in a worker process (its data and tensors built once per process); its wall time."""
    spec = _WORKER["spec"]
    if _WORKER["ctx"] is None:
        _WORKER["ctx"] = StudyContext(spec)
    return float(run_cell(spec, Cell.from_dict(cell_dict), _WORKER["ctx"])["wall_s"])


#: Which ready cell a free worker takes first: the deepest stage, so that seeds finish one after the
#: other (a study stopped half-way has whole seeds), then the grid's order.
_PRIORITY = {"finetune": 0, "search": 1, "pretrain": 2}


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip().splitlines()[0]


def run_parallel(spec: StudySpec) -> None:
    """The cells in ``spec.workers`` processes at once, each when the cells it depends on have finished.

    Every worker is a fresh (spawned) Python process with ``worker_threads(spec)`` torch threads and its
    own copy of the data; all of them write into the one study folder, each cell into its own files.
    Resume is as with one process: finished cells are skipped, a half-written one is redone. A cell that
    fails is named with its error (the traceback goes to ``runs/<cell>/error.log``); the cells that
    depend on it are not started, every other cell still runs, and :class:`CellsFailed` is raised at the
    end. A worker that dies (killed, out of memory) fails the cells it was running the same way.
    """
    todo = [c for wave in cells_of(spec) for c in wave]
    order = {c.key: i for i, c in enumerate(todo)}
    done = {c.key for c in todo if read_result(spec, c) is not None}
    pending = [c for c in todo if c.key not in done]
    needs = {c.key: [d.key for d in depends_on(c, spec)] for c in pending}
    threads = worker_threads(spec)
    print(
        f"study {spec.name}: {len(todo)} cells, {len(done)} already finished; {spec.workers} workers of "
        f"{threads} thread{'s' if threads > 1 else ''}",
        flush=True,
    )
    if not pending:
        return
    failed: dict[str, str] = {}
    skipped: list[str] = []
    running: dict[Future, tuple[Cell, float]] = {}
    durations: dict[str, list[float]] = {}
    started, n_started = time.time(), 0
    pool = ProcessPoolExecutor(
        max_workers=spec.workers,
        mp_context=multiprocessing.get_context("spawn"),  # no fork of a process holding torch threads
        initializer=_init_worker,
        initargs=(asdict(spec), threads),
    )
    broken = False  # a worker died: the pool takes no more cells
    try:
        while (pending and not broken) or running:
            for cell in list(pending):  # cells after a failed one cannot run
                if any(d in failed or d in skipped for d in needs[cell.key]):
                    skipped.append(cell.key)
                    pending.remove(cell)
            ready = sorted(
                (c for c in pending if all(d in done for d in needs[c.key])),
                key=lambda c: (_PRIORITY[c.kind], order[c.key]),
            )
            for cell in [] if broken else ready[: spec.workers - len(running)]:
                pending.remove(cell)
                running[pool.submit(_worker_cell, asdict(cell))] = (cell, time.time())
                n_started += 1
                eta = _eta(durations, pending + [c for c, _ in running.values()])
                eta_text = "" if eta is None else f", about {eta / spec.workers / 60:.0f} min left"
                elapsed = (time.time() - started) / 60
                print(
                    f"[cell {n_started}/{len(needs)}] {cell.key}  (elapsed {elapsed:.1f} min{eta_text})",
                    flush=True,
                )
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, _ = running.pop(future)
                try:
                    wall = future.result()
                except BrokenProcessPool as error:
                    broken = True
                    failed[cell.key] = (
                        f"a worker process died, killed or out of memory ({_error_text(error)})"
                    )
                    print(f"cell {cell.key} FAILED: {failed[cell.key]}", flush=True)
                except Exception as error:  # noqa: BLE001 - any failure of a cell is reported, not raised
                    failed[cell.key] = _error_text(error)
                    log = spec.folder / "runs" / cell.key / "error.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    remote = getattr(error, "__cause__", None)  # the worker's traceback, as text
                    log.write_text(str(remote) if remote else "".join(traceback.format_exception(error)))
                    print(f"cell {cell.key} FAILED: {failed[cell.key]} (traceback: {log})", flush=True)
                else:
                    done.add(cell.key)
                    durations.setdefault(cell.kind, []).append(wall)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        lines = [f"  {key}: {error}" for key, error in failed.items()]
        raise CellsFailed(
            f"{len(failed)} cell(s) of study {spec.name} failed"
            + (f" and {len(skipped)} that depend on them did not run" if skipped else "")
            + (f"; {len(pending)} others were not started after a worker died" if broken and pending else "")
            + ":\n"
            + "\n".join(lines)
            + "\nThe finished cells are kept: fix the cause and run the same command again to resume."
        )


def _cell_job(spec_dict: dict[str, Any], cell_dict: dict[str, Any]) -> str:
    silence_known_noise()  # a SLURM job is a new process: the CLI's filters are not inherited
    spec = StudySpec(**spec_dict)
    cell = Cell.from_dict(cell_dict)  # also a cell queued by an older version (gamma as a 0/1 flag)
    run_cell(spec, cell)
    return cell.key


#: SLURM job states in which a submitted cell is still on its way (not to be submitted again).
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
)  # fmt: skip


def check_slurm(spec: StudySpec) -> None:
    """The cluster settings of a spec, checked before anything is submitted (one-line errors)."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("launcher=slurm, but no `sbatch` is on PATH: run on a SLURM login node")
    partition = spec.slurm.get("slurm_partition") or spec.slurm.get("partition")
    if partition:
        known = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
        if partition not in known:
            raise ValueError(
                f"slurm.slurm_partition={partition!r} does not exist; "
                f"partitions: {', '.join(known) or 'none'}"
            )
    gpus = spec.slurm.get("gpus_per_node") or spec.slurm.get("slurm_gpus_per_node") or 0
    if spec.accelerator in ("gpu", "cuda") and not gpus:
        raise ValueError(
            f"accelerator={spec.accelerator!r} needs one GPU per cell, but slurm: grants none "
            "(set slurm.gpus_per_node: 1, or accelerator: cpu)"
        )


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM's state of each of ``job_ids`` that it still has queued or running (one ``squeue``)."""
    if not job_ids:
        return {}
    listed = subprocess.run(
        ["squeue", "--me", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True
    )
    states = dict(line.split()[:2] for line in listed.stdout.splitlines() if line.strip())
    return {j: states[j] for j in job_ids if states.get(j) in ACTIVE_STATES}


#: The line of a cell's log that says why it failed (the last exception raised).
ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b")


class SubmittedJobs:
    """The study's record of which SLURM job runs which cell (``submitit/jobs.json``).

    A second ``s2ap study`` while cells are queued or running asks SLURM about these ids and submits
    nothing twice (a duplicate would wipe its original's folder); a cell whose job is gone without a
    result is named with its log, then submitted again.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "jobs.json"
        self.folder = folder
        self.jobs: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, cell: Cell, job_id: str) -> None:
        self.jobs[cell.key] = job_id
        with atomic_file(self.path, "w") as fh:
            fh.write(json.dumps(self.jobs, indent=1))

    def log_of(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_0_log.err"

    def report_lost(self, cell: Cell, job_id: str) -> None:
        log = self.log_of(job_id)
        if log.is_file():
            errors = [line for line in log.read_text(errors="replace").splitlines() if ERROR_LINE.match(line)]
            reason = f" ({errors[-1].strip()})" if errors else ""
            print(f"cell {cell.key}: job {job_id} ended without a result{reason}; log: {log}")
        else:
            print(
                f"cell {cell.key}: job {job_id} ended without a result and wrote no log (cancelled before "
                "it ran, e.g. because a cell it depends on failed)"
            )


def run_submitit(spec: StudySpec, executor: Any = None) -> None:
    """One submitit job per unfinished cell, dependencies respected.

    On SLURM the dependencies are SLURM's own (``afterok`` with ``kill-on-invalid-dep``: when a cell
    fails, SLURM cancels the cells that depend on it instead of leaving them pending forever), so this
    returns once everything is queued; cells already queued or running are not submitted again. With
    submitit's local executor (no dependency support) each wave is awaited before the next.
    """
    import submitit  # only the SLURM/submitit launchers need submitit

    folder = spec.folder / "submitit"
    if executor is None:
        if spec.launcher == "submitit_local":
            executor = submitit.LocalExecutor(folder=folder)
        else:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            executor.update_parameters(**spec.slurm)
    on_slurm = not isinstance(executor, submitit.LocalExecutor)
    submitted = SubmittedJobs(folder)
    alive = slurm_states(list(submitted.jobs.values())) if on_slurm else {}
    pending_ids: dict[str, str] = {}  # cell key -> job id of every unfinished cell queued now
    for wave in cells_of(spec):
        wave_jobs = []
        for cell in wave:
            if read_result(spec, cell) is not None:
                continue
            previous = submitted.jobs.get(cell.key)
            if previous in alive:
                pending_ids[cell.key] = previous
                print(f"cell {cell.key} is already queued as job {previous} ({alive[previous]})", flush=True)
                continue
            if previous is not None and on_slurm:
                submitted.report_lost(cell, previous)
            deps = [pending_ids[d.key] for d in depends_on(cell, spec) if d.key in pending_ids]
            if on_slurm:
                extra = dict(spec.slurm.get("slurm_additional_parameters") or {})
                if deps:
                    extra["dependency"] = "afterok:" + ":".join(deps)
                    extra["kill-on-invalid-dep"] = "yes"
                executor.update_parameters(slurm_additional_parameters=extra, name=cell.key.replace("/", "_"))
            job = executor.submit(_cell_job, asdict(spec), asdict(cell))
            pending_ids[cell.key] = str(job.job_id)
            if on_slurm:
                submitted.record(cell, str(job.job_id))
            wave_jobs.append(job)
            print(f"submitted {cell.key} as job {job.job_id}", flush=True)
        if not on_slurm:
            for job in wave_jobs:
                job.result()  # raises if the cell failed


def run_study(spec: StudySpec) -> Path | None:
    """Run (or resume) a study; write ``study.csv``, ``study.md`` and plots when every cell is done."""
    spec.data_settings()  # a missing data config or an unknown data key fails before anything is written
    if spec.launcher == "slurm":
        check_slurm(spec)  # before the spec is written or anything submitted
    save_spec(spec)
    if spec.launcher == "local" and spec.workers > 1:
        run_parallel(spec)
    elif spec.launcher == "local":
        run_local(spec)
    else:
        run_submitit(spec)
    if all(read_result(spec, c) is not None for wave in cells_of(spec) for c in wave):
        path = write_study_report(spec)
        print(f"study written to {path}")
        return path
    print(
        f"cells queued; when they have finished, run the same command again to write {spec.folder}/study.md"
    )
    return None
