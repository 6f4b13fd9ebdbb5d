"""The run directory: what a run writes and what a resumed run reads back.

``out_dir/`` holds ``config.yaml``, the tables ``metrics`` (one row per epoch), ``steps`` (one
row per optimizer step) and ``layer_stats`` (per parameter tensor every ``stats_every`` steps) as
``.csv`` or ``.jsonl``, ``checkpoint.pt`` (written atomically after each epoch: model,
optimizer, scheduler, GradScaler, RNG states, config and metric history) and the one before it,
``checkpoint-prev.pt``, ``failure.json`` when a loss turned non-finite, ``tensorboard/`` when
TensorBoard is installed, ``.lock`` (held while a process writes the directory) and the marker
``.largebatch-run`` (JSON: which command made the run). Rank 0 writes; every rank reads the
checkpoint. Under ``--fsdp`` the checkpoints are the folders ``checkpoint/`` and
``checkpoint-prev/`` (``torch.distributed.checkpoint``, every rank writes its shards:
``fsdp.py``), replaced atomically the same way.

Ownership: ``--overwrite`` and ``--resume`` act only on a directory that is a run of ours: one
holding the marker, or (runs made before the marker existed) a ``config.yaml`` together with a
metrics, steps or layer-statistics table whose header is exactly ours. ``--overwrite`` deletes
only the files a run writes (the names above, their ``.tmp`` files, and inside ``checkpoint*/``,
``tensorboard/`` and ``linear-eval/`` only the files those write); anything else in them, or a
symbolic link in place of one of them, makes it refuse with the directory left as it was.

Checkpoints hold tensors and plain values only (the RNG states too) and are read with
``weights_only=True`` (``safefile.py``): a file that holds anything else is refused, not run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import socket
import stat
from typing import Any, Callable

import numpy as np
import torch

from . import config as config_mod
from . import distributed as dist_mod
from . import fsdp, safefile
from .config import TrainConfig

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_seconds", "images_per_s"]
STEP_COLUMNS = ["step", "epoch", "lr", "lr_eff", "loss"]
STAT_COLUMNS = ["step", "layer", "adapt", "w_norm", "g_norm", "lnr", "trust", "layer_lr"]
RUN_FILES = ["config.yaml", "checkpoint.pt", "checkpoint-prev.pt", "checkpoint", "checkpoint-prev", "failure.json",
             "tensorboard"] + [
    f"{t}.{ext}" for t in ("metrics", "steps", "layer_stats", "noise_scale") for ext in ("csv", "jsonl")]
MARKER = ".largebatch-run"
#: what a run writes besides RUN_FILES: the marker, the .tmp of each file (left by a crash), linear-eval's results
OWNED = RUN_FILES + [MARKER, "linear-eval"] + [n + ".tmp" for n in RUN_FILES + [MARKER]]
#: the only files ``--overwrite`` removes inside the folders a run writes
OWNED_INSIDE = {
    "checkpoint": re.compile(r"(\.metadata|meta\.pt|__\d+_\d+\.distcp|__\d+\.metadata)(\.tmp)?"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
    "linear-eval": re.compile(r"(features-(pretrained|random-init|raw-pixels)\.pt|(pretrained|random-init|raw-pixels)"
                              r"\.json)(\.tmp)?"),
}
CHECKPOINT_KEYS = ("epoch", "global_step", "model", "optimizer", "rng", "config", "history")
SHARDED_KEYS = ("epoch", "global_step", "param_groups", "optim_keys", "rng", "config", "history")


# ----------------------------------------------------------------------------- tables
class Table:
    """Rows of dicts in ``<base>.csv`` or ``<base>.jsonl``; rank 0 writes."""

    def __init__(self, base: str, fmt: str, columns: list[str]):
        self.path = base + (".csv" if fmt == "csv" else ".jsonl")
        self.fmt, self.columns = fmt, columns

    def read(self) -> list[dict[str, Any]]:
        return read_table(self.path)

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the table atomically (a failed write leaves it as it was, and no ``.tmp``)."""
        try:
            safefile.atomic_write(self.path, lambda f: self._rows(f, rows, True))
        except OSError as e:
            raise RunDirError(write_failed(self.path, e)) from None

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            with open(self.path, "a", newline="") as f:
                self._rows(f, rows, new)
        except OSError as e:  # a row cut by a full disk is the last line: read_table drops it
            raise RunDirError(write_failed(self.path, e)) from None

    def _rows(self, f, rows: list[dict[str, Any]], header: bool) -> None:
        if self.fmt == "csv":
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if header:
                w.writeheader()
            w.writerows(rows)
        else:
            for r in rows:
                f.write(json.dumps({k: r.get(k) for k in self.columns}) + "\n")


def write_failed(path: str, e: OSError) -> str:
    """The message of a failed write to the run directory (the run stops; what was written stays)."""
    return (f"could not write {path} ({e.strerror or first_line(e)}; disk full?). The run stopped; the files "
            f"already written are intact (the last checkpoint is kept): free space, then continue with --resume")


def read_table(path: str) -> list[dict[str, Any]]:
    """Read a metrics table written by :class:`Table` (numbers come back as float/int).

    Tables are appended a row at a time, so a crash can only leave the *last* line cut: a
    final line without its newline, or with empty fields, is not a row and is dropped (the run
    that resumes rewrites the table). Damage anywhere else raises ``ValueError`` naming the file.
    """
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):  # a line cut by a crash mid-append
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if path.endswith(".jsonl"):
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not a JSON row ({e.msg}); restore or delete the file") from None
        return rows
    rows = list(csv.DictReader(lines))
    damaged = [i for i, r in enumerate(rows) if None in r or any(v in (None, "") for v in r.values())]
    if damaged and damaged != [len(rows) - 1]:
        raise ValueError(f"{path}: row {damaged[0] + 1} has missing fields; restore or delete the file")
    return [{k: _num(v) for k, v in r.items()} for r in rows[: len(rows) - len(damaged)]]


def _num(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except (TypeError, ValueError):
            pass
    return v


NONFINITE_ADVICE = (" To try other settings (a lower --lr, a longer --warmup-epochs, another optimizer), start a "
                    "new run in another --out-dir, or add --overwrite to replace this one; --resume continues "
                    "only with the same configuration.")


# ----------------------------------------------------------------------------- the directory
class RunDirError(RuntimeError):
    """The run directory could not be written (disk full, permissions): the message says what was kept."""


class RunDir:
    """``out_dir`` of one run: its tables, checkpoints, failure record and TensorBoard writer.

    Nothing is lost: :meth:`inspect` decides, reading only, whether this invocation may use the
    directory (a run already there is continued with ``--resume`` or replaced with
    ``--overwrite``, never silently rewritten; a directory that is not a run of ours is never
    touched); :meth:`create` then takes an exclusive lock (``.lock``, ``flock``: released by
    the kernel when the process dies, so ``kill -9`` and ``--resume`` still work) so that two
    processes never write one directory; checkpoints are written atomically and the previous one
    is kept as ``checkpoint-prev.pt``, the fallback when the latest cannot be read.
    ``command``: the sub-command writing the run (``train``, ``pretrain``), kept in the marker.
    """

    def __init__(self, out_dir: str, fmt: str, is_main: bool, metric_columns: list[str] = METRIC_COLUMNS,
                 sharded: bool = False, command: str = "train"):
        self.path, self.is_main, self.sharded, self.command = out_dir, is_main, sharded, command
        ext = "" if sharded else ".pt"
        self.checkpoint_path = os.path.join(out_dir, "checkpoint" + ext)
        self.previous_path = os.path.join(out_dir, "checkpoint-prev" + ext)
        self.metrics = Table(os.path.join(out_dir, "metrics"), fmt, metric_columns)
        self.steps = Table(os.path.join(out_dir, "steps"), fmt, STEP_COLUMNS)
        self.stats = Table(os.path.join(out_dir, "layer_stats"), fmt, STAT_COLUMNS)
        self.tb = None
        self._lock = None
        self._seen: list[str] | None = None

    # ------------------------------------------------------------------ before anything is written
    def run_files(self) -> list[str]:
        """The files of a run present in the directory (any format). A symbolic link, or a
        non-regular file, in place of one of them is refused (``ValueError``): a run never
        writes one, and reading or writing through it would reach outside the directory."""
        if not os.path.isdir(self.path):
            return []
        names = []
        for n in RUN_FILES + [MARKER, ".lock"]:
            q = os.path.join(self.path, n)
            if not os.path.lexists(q):
                continue
            mode = os.lstat(q).st_mode
            want_dir = n in ("checkpoint", "checkpoint-prev", "tensorboard")
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) if want_dir else stat.S_ISREG(mode)):
                what = ("a symbolic link" if stat.S_ISLNK(mode)
                        else "not a " + ("folder" if want_dir else "regular file"))
                raise ValueError(f"out_dir: {q} is {what}, which a largebatch run never writes; nothing was "
                                 f"changed: remove it or choose another --out-dir")
            if n != ".lock":
                names.append(n)
        return names

    def marker(self) -> dict[str, Any] | None:
        """The marker's content, or ``None`` (absent or not ours)."""
        try:
            with open(os.path.join(self.path, MARKER)) as f:
                m = json.loads(f.read(4096))
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) and m.get("tool") == "largebatch" and isinstance(m.get("command"), str) \
            else None

    def owner(self) -> str | None:
        """The command that made the run in ``out_dir`` (``train``, ``pretrain``), or ``None`` when
        the directory is not a run of ours. A run made before the marker existed counts as ours only
        with a ``config.yaml`` and a table whose header is exactly one of ours."""
        m = self.marker()
        if m is not None:
            return m["command"]
        saved = os.path.join(self.path, "config.yaml")
        if not os.path.isfile(saved):
            return None
        headers = [self.metrics.columns, METRIC_COLUMNS, STEP_COLUMNS, STAT_COLUMNS]
        for t in (self.metrics, self.steps, self.stats):
            for ext in (".csv", ".jsonl"):
                if header_of(os.path.splitext(t.path)[0] + ext) in headers:
                    try:
                        cfg = config_mod.load_file(saved)
                    except ValueError:
                        return None
                    return "pretrain" if "projector" in cfg else "train"
        return None

    def inspect(self, cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
        """Read-only: may this invocation use ``out_dir``? Returns the checkpoint to resume from
        (``None``: start from scratch). Every refusal is a ``ValueError`` saying what to do."""
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise ValueError(f"out_dir: {p} exists and is not a directory; choose another --out-dir")
        parent = _existing_ancestor(p)
        if not os.path.isdir(parent):
            raise ValueError(f"out_dir: {parent} is not a directory, so {p} cannot be created; choose another --out-dir")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"out_dir: {parent} is not writable; choose another --out-dir")
        self._seen = self.run_files()
        if not self._seen:
            if cfg.resume:
                log(f"resume: no run in {p} yet; starting from scratch")
            return None
        held = ", ".join(self._seen)
        owner = self.owner()
        if owner is None:
            raise ValueError(f"out_dir: {p} holds {held} but is not a largebatch run (no {MARKER}, no metrics "
                             f"table of ours); nothing was changed: choose another --out-dir")
        if cfg.overwrite:
            self._overwrite_plan()  # refuses when the run's folders hold files that are not the run's
            return None
        if not cfg.resume:
            raise ValueError(f"out_dir: {p} already holds a run ({held}); pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out-dir")
        if owner != self.command:
            raise ValueError(f"out_dir: {p} holds a run made by `largebatch {owner}`, which `largebatch "
                             f"{self.command} --resume` cannot continue: run `largebatch {owner} --resume` with "
                             f"the same --out-dir, or choose another --out-dir")
        state = self._read_checkpoint(log)
        if state is not None:
            check_resume_config(cfg, state["config"])
            return state
        if self.metrics.read():
            raise ValueError(f"out_dir: {p} holds a run with finished epochs but no checkpoint to resume from "
                             f"(it ran with checkpoint: false); pass --overwrite to replace it or choose another "
                             f"--out-dir")
        saved = os.path.join(p, "config.yaml")
        if os.path.exists(saved):
            check_resume_config(cfg, config_mod.load_file(saved))
        log(f"resume: {p} has no checkpoint yet (stopped in its first epoch); starting it from scratch")
        return None

    def _overwrite_plan(self) -> list[str]:
        """What ``--overwrite`` removes, deepest first: the run's files and, inside the folders it
        writes, only the files it writes. Refuses (``ValueError``, nothing removed) when one of them
        is a link or holds anything else."""
        plan = []
        for n in OWNED:
            q = os.path.join(self.path, n)
            if not os.path.lexists(q):
                continue
            if os.path.islink(q):
                raise ValueError(f"out_dir: {q} is a symbolic link, which a largebatch run never writes; nothing "
                                 f"was changed: remove it, or choose another --out-dir")
            if not os.path.isdir(q):
                plan.append(q)
                continue
            pattern = OWNED_INSIDE["checkpoint" if n.startswith("checkpoint") else n] \
                if (n.startswith("checkpoint") or n in OWNED_INSIDE) else None
            inside = sorted(os.listdir(q))
            foreign = [x for x in inside if pattern is None or not pattern.fullmatch(x)
                       or not stat.S_ISREG(os.lstat(os.path.join(q, x)).st_mode)]
            if foreign:
                raise ValueError(f"out_dir: {q} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                                 f"which a largebatch run does not write; nothing was changed: move it out, then "
                                 f"--overwrite, or choose another --out-dir")
            plan += [os.path.join(q, x) for x in inside] + [q]
        return plan

    def _read_checkpoint(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The latest readable checkpoint, falling back to the previous one (and saying so). Read
        with ``weights_only=True``: a file holding anything but tensors and plain values is
        refused, never run; an ``--fsdp`` folder's shards are checked against the sizes and
        checksums its ``meta.pt`` recorded."""
        problems = []
        for name in ("checkpoint.pt", "checkpoint", "checkpoint-prev.pt", "checkpoint-prev"):
            path = os.path.join(self.path, name)
            if not os.path.lexists(path):
                continue
            try:
                if os.path.islink(path):
                    raise ValueError("a symbolic link, which a largebatch run never writes")
                if os.path.isdir(path):  # --fsdp: a torch.distributed.checkpoint folder
                    state, want = {**fsdp.read_meta(path), "dcp": path}, SHARDED_KEYS
                else:
                    state, want = safefile.load_tensors(path), CHECKPOINT_KEYS
                _check_state(state, want)
            except Exception as e:  # truncated, empty, random or foreign: all mean "unreadable"
                problems.append(f"{path} cannot be read ({first_line(e)})")
                continue
            if problems:
                log(f"resume: {problems[0]}; falling back to the previous checkpoint {path} (epoch {state['epoch']})")
            state["file"] = path
            return state
        if problems:
            raise ValueError(f"resume: no readable checkpoint in {self.path}: {'; '.join(problems)}. Pass "
                             f"--overwrite to start the run again, or choose another --out-dir")
        return None

    def create(self, cfg: TrainConfig) -> None:
        """Rank 0: make the folder, lock it, clear it when overwriting, write the marker and
        ``config.yaml``. A failed write raises :class:`RunDirError` (no ``.tmp`` is left)."""
        if not self.is_main:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self._take_lock()
            now = self.run_files()
            if cfg.overwrite:
                for q in self._overwrite_plan():
                    os.rmdir(q) if os.path.isdir(q) and not os.path.islink(q) else os.remove(q)
            elif now != self._seen:
                raise ValueError(f"out_dir: {self.path} changed while this run was starting (another run wrote "
                                 f"{', '.join(sorted(set(now) - set(self._seen or [])))}); choose another --out-dir")
            m = self.marker()
            if m is None or m.get("command") != self.command:
                from largebatch import __version__
                from largebatch._provenance import commit

                safefile.write_text(os.path.join(self.path, MARKER), json.dumps(
                    {"tool": "largebatch", "command": self.command, "version": __version__, "commit": commit()}) + "\n")
            config_mod.save(cfg, os.path.join(self.path, "config.yaml"))
        except OSError as e:
            self.close()
            raise RunDirError(f"out_dir: cannot write {e.filename or self.path} ({e.strerror or first_line(e)}); "
                              f"free space or fix the permissions, or choose another --out-dir") from None
        except ValueError:
            self.close()
            raise

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        # never through a link: a ".lock" pointing elsewhere would truncate the file it points to
        fd = os.open(os.path.join(self.path, ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        f = open(fd, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read(200).strip() or "another process"
            f.close()
            raise ValueError(f"out_dir: {self.path} is in use by another largebatch run ({holder}); wait for it "
                             f"to finish or choose another --out-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._lock = f

    def open(self, history: list[dict[str, Any]], global_step: int) -> None:
        """Rank 0: tables as of the checkpoint (rows past it, from a run interrupted mid-epoch,
        are dropped) and the TensorBoard writer."""
        if not self.is_main:
            return
        self.metrics.rewrite(history)
        for t in (self.steps, self.stats):
            t.rewrite([r for r in t.read() if r["step"] < global_step])
        self.tb = _tensorboard(self.path)

    def write_epoch(self, history: list[dict[str, Any]], step_rows: list[dict[str, Any]],
                    stat_rows: list[dict[str, Any]]) -> None:
        """Rank 0 (caller checks): an epoch's steps and layer statistics, the metric history,
        TensorBoard scalars of its last row."""
        self.steps.append(step_rows)
        self.stats.append(stat_rows)
        self.metrics.rewrite(history)
        if self.tb is not None:
            row = history[-1]
            try:
                for k in self.metrics.columns[2:]:
                    if isinstance(row.get(k), (int, float)):
                        self.tb.add_scalar(k, row[k], row["epoch"])
                self.tb.flush()
            except OSError as e:
                raise RunDirError(write_failed(os.path.join(self.path, "tensorboard"), e)) from None

    def save_checkpoint(self, model, opt, sched, scaler, cfg, epoch, global_step, history, device) -> None:
        """Every rank calls it. Atomic: write ``checkpoint.pt.tmp``, keep the current one as
        ``checkpoint-prev.pt``, then ``os.replace`` (rank 0; ``--fsdp``: every rank writes its shards
        of the folder ``checkpoint.tmp/``, then rank 0 renames folders the same way). A crash leaves
        a readable checkpoint; a failed write (full disk) removes the ``.tmp`` and raises
        :class:`RunDirError` (the previous checkpoint is kept)."""
        if not (self.is_main or self.sharded):
            return
        state = {"epoch": epoch, "global_step": global_step,
                 "scheduler": sched.state_dict() if sched is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state(device),
                 "config": cfg.to_dict(), "history": history}
        tmp = self.checkpoint_path + ".tmp"
        try:
            if self.sharded:
                self._save_sharded(tmp, model, opt, state, device)
            else:
                safefile.clear(tmp)  # one left by a crash (or a link planted there) is not written through
                torch.save({**state, "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
                if os.path.exists(self.checkpoint_path):
                    os.replace(self.checkpoint_path, self.previous_path)
                os.replace(tmp, self.checkpoint_path)
        except (OSError, RuntimeError) as e:
            with contextlib.suppress(OSError):
                safefile.clear(tmp)
            kept = next((q for q in (self.checkpoint_path, self.previous_path) if os.path.exists(q)), None)
            raise RunDirError(f"could not write the checkpoint of epoch {epoch} to {self.path} "
                              f"({first_line(e)}; disk full?). "
                              + (f"{kept} is kept; free space, then continue with --resume." if kept else
                                 "No checkpoint was written; free space and start again.")) from None

    def _save_sharded(self, tmp: str, model, opt, state: dict[str, Any], device: torch.device) -> None:
        """The DCP folder ``tmp`` (every rank), then the rotation (rank 0); a failure on rank 0
        is raised on every rank (no rank waits for it forever)."""
        def on_rank0(fn):
            err = None
            if self.is_main:
                try:
                    fn()
                except (OSError, RuntimeError) as e:
                    err = e
            if _any_rank(err is not None, device):
                raise err or OSError(f"rank 0 could not prepare or rename the checkpoint folders in {self.path}")

        on_rank0(lambda: safefile.clear(tmp))  # a folder left by a crash
        meta = fsdp.save(tmp, model, opt, state)  # raises on every rank when one rank fails
        on_rank0(lambda: self._rotate(tmp, meta))

    def _rotate(self, tmp: str, meta: dict[str, Any]) -> None:
        fsdp.write_meta(tmp, meta)
        if os.path.exists(self.checkpoint_path):
            safefile.clear(self.previous_path)
            os.replace(self.checkpoint_path, self.previous_path)
        os.replace(tmp, self.checkpoint_path)

    @staticmethod
    def restore(state: dict[str, Any], model, opt, sched, scaler,
                device: torch.device) -> tuple[int, int, list[dict[str, Any]]]:
        """Load a checkpoint into the run's objects and RNGs; returns (epoch, global step, history).
        A DCP folder (``--fsdp``) is loaded by every rank, resharded to this run's processes.
        A checkpoint that does not fit the run (edited, or of another model) is a ``ValueError``
        naming it."""
        try:
            built = [dict(g) for g in opt.param_groups]
            if "dcp" in state:
                fsdp.load(state["dcp"], state, model, opt)
            else:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
            _check_groups(built, opt.param_groups)
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            _set_rng(state["rng"], device)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ValueError(f"resume: {state.get('file', 'the checkpoint')} does not fit this run "
                             f"({first_line(e)}); pass --overwrite to start the run again, or choose another "
                             f"--out-dir") from None
        return state["epoch"], state["global_step"], state["history"]

    def failure_record(self, step_losses: torch.Tensor, info: dist_mod.DistInfo, epoch: int, first_step: int,
                       cfg: TrainConfig) -> dict[str, Any]:
        """What ``failure.json`` holds, from this epoch's losses so far. Every rank calls it (all-reduce)."""
        losses = step_losses.detach().float().reshape(1, -1).clone()
        bad = (~torch.isfinite(losses)).float()
        dist_mod.all_reduce_sum(bad, info)
        i = int(torch.nonzero(bad[0] > 0)[0, 0])
        return self._failure(f"non-finite training loss ({float(losses[0, i])}) at epoch {epoch + 1}, step {i + 1} "
                             f"of the epoch (global step {first_step + i})", float(losses[0, i]), epoch,
                             i + 1, first_step + i, cfg)

    def test_failure(self, test_loss: float, epoch: int, global_step: int, cfg: TrainConfig) -> dict[str, Any]:
        """``failure.json`` for a non-finite *test* loss (the eval-mode model's outputs, e.g. BatchNorm's
        running statistics, are not finite although training losses were)."""
        return self._failure(f"non-finite test loss ({test_loss}) after epoch {epoch + 1} (global step "
                             f"{global_step}); the epoch's checkpoint was not written", test_loss, epoch, None,
                             global_step, cfg)

    def _failure(self, what: str, loss: float, epoch: int, step_in_epoch: int | None, global_step: int,
                 cfg: TrainConfig) -> dict[str, Any]:
        ckpt = self.checkpoint_path
        have = cfg.checkpoint and os.path.exists(ckpt)
        msg = (f"{what}; training stopped. "
               + (f"The last good checkpoint is {ckpt} (epoch {self._epoch_of(ckpt)})."
                  if have else "No checkpoint was written before it.")
               + NONFINITE_ADVICE)
        return {"message": msg, "epoch": epoch + 1, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "loss": str(loss), "checkpoint": ckpt if have else None}

    @staticmethod
    def _epoch_of(path: str) -> int:
        if os.path.isdir(path):
            return fsdp.read_meta(path)["epoch"]
        return safefile.load_tensors(path)["epoch"]

    def write_failure(self, failure: dict[str, Any]) -> None:
        if self.is_main:
            path = os.path.join(self.path, "failure.json")
            try:
                safefile.write_text(path, json.dumps(failure, indent=2))
            except OSError as e:
                raise RunDirError(write_failed(path, e)) from None

    def close(self) -> None:
        """Close TensorBoard and release the lock (also done by the kernel if the process dies)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


# ----------------------------------------------------------------------------- helpers
def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` of any rank (a collective; the value itself without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _tensorboard(out: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    path = os.path.join(out, "tensorboard")
    try:
        return SummaryWriter(path)
    except OSError as e:
        raise RunDirError(write_failed(path, e)) from None


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (what ``weights_only`` loading accepts)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # a tuple with a NumPy array: checkpoints of earlier versions
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _check_state(state: Any, want: tuple[str, ...]) -> None:
    """``ValueError`` unless ``state`` has the keys and plain types of a checkpoint of ours."""
    missing = [k for k in want if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a largebatch checkpoint (no {', '.join(missing)})")
    safefile.check_size(state, 1_000_000, "the file")  # pickle's memo can alias a list 10^9 times
    ok = (isinstance(state["epoch"], int) and isinstance(state["global_step"], int) and state["epoch"] >= 0
          and isinstance(state["config"], dict) and isinstance(state["rng"], dict)
          and isinstance(state["history"], list) and all(isinstance(r, dict) for r in state["history"]))
    if not ok:
        raise ValueError("not a largebatch checkpoint (epoch, global_step, config, rng or history of another type)")


def _check_groups(built: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> None:
    """A loaded hyper-parameter that is a number in the optimizer as built must be a finite number
    (a checkpoint's ``lr: "0.1"`` or NaN would fail, or silently spoil, the first step)."""
    def real(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for i, (b, g) in enumerate(zip(built, loaded)):
        for k, v in b.items():
            if real(v) and not (real(g.get(k)) and math.isfinite(g[k])):
                raise ValueError(f"optimizer param_groups[{i}][{k!r}] is {g.get(k)!r}, not a finite number")


def header_of(path: str) -> list[str] | None:
    """The column names of a table file (the CSV header, the first JSON row's keys), or ``None``."""
    try:
        with open(path, newline="") as f:
            line = f.readline(4096)
    except (OSError, UnicodeDecodeError):
        return None
    if path.endswith(".jsonl"):
        try:
            row = json.loads(line)
        except ValueError:
            return None
        return list(row) if isinstance(row, dict) else None
    return next(csv.reader([line]), None)


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one short line (its type when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    return p


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    """A resumed run must have the saved configuration, except for ``RESUME_MUTABLE`` fields and
    ``epochs`` when the schedule does not depend on it (``schedule: none``, e.g. TVLARS)."""
    now = cfg.to_dict()
    for k, v in saved.items():
        if k in config_mod.RESUME_MUTABLE:
            continue
        if k == "epochs" and k in now and now[k] != v:
            if saved.get("schedule") != "none":
                raise ValueError(f"epochs: the checkpointed run has {v} epochs and a {saved.get('schedule')!r} "
                                 f"schedule whose length is fixed by them, so it cannot be extended to {now[k]}; "
                                 f"start a new run (another --out-dir) with --epochs {now[k]}")
            continue
        if k in now and now[k] != v:
            raise ValueError(f"{k}: differs from the checkpointed run ({v!r} there, {now[k]!r} now); "
                             f"resume with the same configuration")
