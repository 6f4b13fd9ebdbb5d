"""The run directory: what a run writes and what a resumed run reads back.

``out_dir/`` holds ``config.yaml``, the tables ``metrics`` (one row per epoch), ``steps`` (one
row per optimizer step) and ``layer_stats`` (per parameter tensor every ``stats_every`` steps) as
``.csv`` or ``.jsonl``, ``checkpoint.pt`` (written atomically after each epoch: model,
optimizer, scheduler, GradScaler, RNG states, config and metric history) and the one before it,
``checkpoint-prev.pt``, ``failure.json`` when a loss turned non-finite, ``tensorboard/`` when
TensorBoard is installed, and ``.lock`` (held while a process writes the directory). Rank 0
writes; every rank reads the checkpoint. Under ``--fsdp`` the checkpoints are the folders
``checkpoint/`` and ``checkpoint-prev/`` (``torch.distributed.checkpoint``, every rank writes its
shards: ``fsdp.py``), replaced atomically the same way.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import socket
from typing import Any, Callable

import numpy as np
import torch

from . import config as config_mod
from . import distributed as dist_mod
from . import fsdp
from .config import TrainConfig

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_seconds", "images_per_s"]
STEP_COLUMNS = ["step", "epoch", "lr", "lr_eff", "loss"]
STAT_COLUMNS = ["step", "layer", "adapt", "w_norm", "g_norm", "lnr", "trust", "layer_lr"]
RUN_FILES = ["config.yaml", "checkpoint.pt", "checkpoint-prev.pt", "checkpoint", "checkpoint-prev", "failure.json",
             "tensorboard"] + [
    f"{t}.{ext}" for t in ("metrics", "steps", "layer_stats", "noise_scale") for ext in ("csv", "jsonl")]
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
        tmp = self.path + ".tmp"
        self._write(tmp, rows, "w")
        os.replace(tmp, self.path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self._write(self.path, rows, "a")

    def _write(self, path: str, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, mode, newline="") as f:
            if self.fmt == "csv":
                w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerows(rows)
            else:
                for r in rows:
                    f.write(json.dumps({k: r.get(k) for k in self.columns}) + "\n")


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
    ``--overwrite``, never silently rewritten); :meth:`create` then takes an exclusive lock
    (``.lock``, ``flock``: released by the kernel when the process dies, so ``kill -9`` and
    ``--resume`` still work) so that two processes never write one directory; checkpoints are
    written atomically and the previous one is kept as ``checkpoint-prev.pt``, the fallback when
    the latest cannot be read.
    """

    def __init__(self, out_dir: str, fmt: str, is_main: bool, metric_columns: list[str] = METRIC_COLUMNS,
                 sharded: bool = False):
        self.path, self.is_main, self.sharded = out_dir, is_main, sharded
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
        """The files of a run present in the directory (any format)."""
        if not os.path.isdir(self.path):
            return []
        names = [n for n in RUN_FILES if os.path.exists(os.path.join(self.path, n))]
        return names

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
        if not self._seen or cfg.overwrite:
            if cfg.resume:
                log(f"resume: no run in {p} yet; starting from scratch")
            return None
        held = ", ".join(self._seen)
        if not cfg.resume:
            raise ValueError(f"out_dir: {p} already holds a run ({held}); pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out-dir")
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

    def _read_checkpoint(self, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The latest readable checkpoint, falling back to the previous one (and saying so)."""
        problems = []
        for name in ("checkpoint.pt", "checkpoint", "checkpoint-prev.pt", "checkpoint-prev"):
            path = os.path.join(self.path, name)
            if not os.path.exists(path):
                continue
            try:
                if os.path.isdir(path):  # --fsdp: a torch.distributed.checkpoint folder
                    state, want = {**fsdp.read_meta(path), "dcp": path}, SHARDED_KEYS
                else:
                    state, want = torch.load(path, map_location="cpu", weights_only=False), CHECKPOINT_KEYS
                missing = [k for k in want if not isinstance(state, dict) or k not in state]
                if missing:
                    raise ValueError(f"not a largebatch checkpoint (no {', '.join(missing)})")
            except Exception as e:  # truncated, empty, random or foreign: all mean "unreadable"
                problems.append(f"{path} cannot be read ({first_line(e)})")
                continue
            if problems:
                log(f"resume: {problems[0]}; falling back to the previous checkpoint {path} (epoch {state['epoch']})")
            return state
        if problems:
            raise ValueError(f"resume: no readable checkpoint in {self.path}: {'; '.join(problems)}. Pass "
                             f"--overwrite to start the run again, or choose another --out-dir")
        return None

    def create(self, cfg: TrainConfig) -> None:
        """Rank 0: make the folder, lock it, clear it when overwriting, write ``config.yaml``."""
        if not self.is_main:
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self._take_lock()
            now = self.run_files()
            if cfg.overwrite:
                for name in now:
                    q = os.path.join(self.path, name)
                    shutil.rmtree(q) if os.path.isdir(q) else os.remove(q)
            elif now != self._seen:
                raise ValueError(f"out_dir: {self.path} changed while this run was starting (another run wrote "
                                 f"{', '.join(sorted(set(now) - set(self._seen or [])))}); choose another --out-dir")
            config_mod.save(cfg, os.path.join(self.path, "config.yaml"))
        except OSError as e:
            self.close()
            raise ValueError(f"out_dir: cannot write {self.path} ({e.strerror or e}); choose another --out-dir") from None
        except ValueError:
            self.close()
            raise

    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        f = open(os.path.join(self.path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
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
            for k in self.metrics.columns[2:]:
                if isinstance(row.get(k), (int, float)):
                    self.tb.add_scalar(k, row[k], row["epoch"])
            self.tb.flush()

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
                torch.save({**state, "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
                if os.path.exists(self.checkpoint_path):
                    os.replace(self.checkpoint_path, self.previous_path)
                os.replace(tmp, self.checkpoint_path)
        except (OSError, RuntimeError) as e:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
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

        on_rank0(lambda: shutil.rmtree(tmp) if os.path.exists(tmp) else None)  # a folder left by a crash
        meta = fsdp.save(tmp, model, opt, state)  # raises on every rank when one rank fails
        on_rank0(lambda: self._rotate(tmp, meta))

    def _rotate(self, tmp: str, meta: dict[str, Any]) -> None:
        fsdp.write_meta(tmp, meta)
        if os.path.exists(self.checkpoint_path):
            if os.path.exists(self.previous_path):
                shutil.rmtree(self.previous_path)
            os.replace(self.checkpoint_path, self.previous_path)
        os.replace(tmp, self.checkpoint_path)

    @staticmethod
    def restore(state: dict[str, Any], model, opt, sched, scaler,
                device: torch.device) -> tuple[int, int, list[dict[str, Any]]]:
        """Load a checkpoint into the run's objects and RNGs; returns (epoch, global step, history).
        A DCP folder (``--fsdp``) is loaded by every rank, resharded to this run's processes."""
        if "dcp" in state:
            fsdp.load(state["dcp"], state, model, opt)
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng(state["rng"], device)
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
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]

    def write_failure(self, failure: dict[str, Any]) -> None:
        if self.is_main:
            with open(os.path.join(self.path, "failure.json"), "w") as f:
                json.dump(failure, f, indent=2)

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
    return SummaryWriter(os.path.join(out, "tensorboard"))


def _rng_state(device: torch.device) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


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
