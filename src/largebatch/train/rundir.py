"""The run directory: what a run writes and what a resumed run reads back.

``out_dir/`` holds ``config.yaml``, the tables ``metrics`` (one row per epoch), ``steps`` (one
row per optimizer step) and ``layer_stats`` (per parameter tensor every ``stats_every`` steps) as
``.csv`` or ``.jsonl``, ``checkpoint.pt`` (written atomically after each epoch: model,
optimizer, scheduler, GradScaler, RNG states, config and metric history), ``failure.json`` when
a loss turned non-finite, and ``tensorboard/`` when TensorBoard is installed. Rank 0 writes;
every rank reads the checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import random
from typing import Any, Callable

import numpy as np
import torch

from . import config as config_mod
from . import distributed as dist_mod
from .config import TrainConfig

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_seconds", "images_per_s"]
STEP_COLUMNS = ["step", "epoch", "lr", "lr_eff", "loss"]
STAT_COLUMNS = ["step", "layer", "adapt", "w_norm", "g_norm", "lnr", "trust", "layer_lr"]


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


# ----------------------------------------------------------------------------- the directory
class RunDir:
    """``out_dir`` of one run: its tables, checkpoint, failure record and TensorBoard writer."""

    def __init__(self, out_dir: str, fmt: str, is_main: bool):
        self.path, self.is_main = out_dir, is_main
        self.checkpoint_path = os.path.join(out_dir, "checkpoint.pt")
        self.metrics = Table(os.path.join(out_dir, "metrics"), fmt, METRIC_COLUMNS)
        self.steps = Table(os.path.join(out_dir, "steps"), fmt, STEP_COLUMNS)
        self.stats = Table(os.path.join(out_dir, "layer_stats"), fmt, STAT_COLUMNS)
        self.tb = None

    def load_checkpoint(self, cfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
        """The checkpoint to resume from (``None``: start from scratch). A checkpoint without
        ``--resume``, or one written under another configuration, is a ``ValueError``."""
        if cfg.checkpoint and os.path.exists(self.checkpoint_path):
            if not cfg.resume:
                raise ValueError(f"out_dir: {self.path} already holds a checkpoint; pass --resume to continue it "
                                 f"or choose another --out-dir")
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
            _check_resume_config(cfg, state["config"])
            return state
        if cfg.resume:
            log(f"resume: no checkpoint in {self.path}; starting from scratch")
        return None

    def create(self, cfg: TrainConfig) -> None:
        """Rank 0: make the folder and write ``config.yaml``."""
        if self.is_main:
            os.makedirs(self.path, exist_ok=True)
            config_mod.save(cfg, os.path.join(self.path, "config.yaml"))

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
            for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                self.tb.add_scalar(k, row[k], row["epoch"])
            self.tb.flush()

    def save_checkpoint(self, model, opt, sched, scaler, cfg, epoch, global_step, history, device) -> None:
        """Atomic: write ``path.tmp`` then ``os.replace`` (a crash leaves the previous checkpoint intact)."""
        state = {"epoch": epoch, "global_step": global_step, "model": model.state_dict(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state(device),
                 "config": cfg.to_dict(), "history": history}
        tmp = self.checkpoint_path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    @staticmethod
    def restore(state: dict[str, Any], model, opt, sched, scaler,
                device: torch.device) -> tuple[int, int, list[dict[str, Any]]]:
        """Load a checkpoint into the run's objects and RNGs; returns (epoch, global step, history)."""
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
        ckpt = self.checkpoint_path
        losses = step_losses.detach().float().reshape(1, -1).clone()
        bad = (~torch.isfinite(losses)).float()
        dist_mod.all_reduce_sum(bad, info)
        i = int(torch.nonzero(bad[0] > 0)[0, 0])
        have = cfg.checkpoint and os.path.exists(ckpt)
        msg = (f"non-finite training loss ({float(losses[0, i])}) at epoch {epoch + 1}, step {i + 1} of the epoch "
               f"(global step {first_step + i}); training stopped. "
               + (f"The last good checkpoint is {ckpt} "
                  f"(epoch {torch.load(ckpt, map_location='cpu', weights_only=False)['epoch']})."
                  if have else "No checkpoint was written before it.")
               + " Try a lower --lr, a longer --warmup-epochs or another optimizer.")
        return {"message": msg, "epoch": epoch + 1, "step_in_epoch": i + 1, "global_step": first_step + i,
                "loss": str(float(losses[0, i])), "checkpoint": ckpt if have else None}

    def write_failure(self, failure: dict[str, Any]) -> None:
        if self.is_main:
            with open(os.path.join(self.path, "failure.json"), "w") as f:
                json.dump(failure, f, indent=2)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- helpers
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


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    now = cfg.to_dict()
    for k, v in saved.items():
        if k in config_mod.RESUME_MUTABLE:
            continue
        if k in now and now[k] != v:
            raise ValueError(f"{k}: differs from the checkpointed run ({v!r} there, {now[k]!r} now); "
                             f"resume with the same configuration")
