"""The training loop: one optimizer step per global batch, diagnostics without per-step host syncs.

Batch arithmetic (issue 4): ``global batch = micro-batch x accumulation steps x world size``.
Each process draws its share of an epoch's permutation (``distributed.shard``), splits its
``batch_size / world_size`` rows of a step into micro-batches, and back-propagates
``sum of per-sample losses / rows of this step``; DDP's gradient average over ranks then yields the
gradient of the mean loss over the global batch (SPEC notation: ``g`` is the global-batch
gradient), whatever the accumulation. Gradient all-reduce happens once per step (``no_sync`` on
the other micro-batches).

Step counting: ``steps_per_epoch = floor(ceil(N / world) / (B / world))`` (``drop_last``, the
default) or the ceiling. Warm-up epochs, TVLARS's delay ``d_e`` (SPEC: "delay is counted in
optimizer steps") and the schedule length are converted with this one number:
``round(epochs * steps_per_epoch)``.

Host syncs: the loop only copies device tensors to the host at the end of an epoch (metrics,
per-step losses, recorded layer statistics) and every ``CHECK_EVERY`` steps (a single bool: did a
loss turn non-finite), plus the progress bar's loss when a terminal shows it.

Runs are resumable exactly: the data order and augmentation of epoch ``e`` come from a generator
seeded with ``(seed, e)``; the checkpoint written (atomically) after each epoch holds model,
optimizer, scheduler, GradScaler, RNG states and the metric history.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config as config_mod
from . import data as data_mod
from . import distributed as dist_mod
from .config import TrainConfig
from .models import build_model, init_weights

CHECK_EVERY = 50  # steps between the (one-bool) checks for a non-finite loss

# Default trust coefficients when --eta is not given (SPEC defaults).
_ETA_DEFAULT = {"lars": 1e-3, "tvlars": 1e-3, "lalc": 0.01, "clars": 0.01}


# ----------------------------------------------------------------------------- run results
@dataclass
class RunResult:
    status: str  # "finished", "stopped" (stop_after_epochs), "nonfinite"
    out_dir: str
    epochs_completed: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    failure: dict[str, Any] | None = None
    seconds: float = 0.0
    model: nn.Module | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- building blocks
def steps_per_epoch(n_train: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Optimizer steps per epoch for ``n_train`` samples at global batch ``batch_size``."""
    per_rank_n = -(-n_train // world_size)
    per_rank_b = batch_size // world_size
    spe = per_rank_n // per_rank_b if drop_last else -(-per_rank_n // per_rank_b)
    if spe < 1:
        raise ValueError(f"batch_size: {batch_size} exceeds the training set ({n_train} samples) with "
                         f"drop_last; lower batch_size or pass --no-drop-last")
    return spe


def build_optimizer(cfg: TrainConfig, model: nn.Module, spe: int) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``param_groups(model, weight_decay)``.

    Biases and normalization parameters (ndim <= 1) get no weight decay and, for the layer-wise
    optimizers, no trust ratio (SPEC notation); SGD uses the same groups.
    """
    from largebatch import optim as lb

    groups = lb.param_groups(model, weight_decay=cfg.weight_decay)
    lr = effective_lr(cfg)
    eta = cfg.eta if cfg.eta is not None else _ETA_DEFAULT.get(cfg.optimizer)
    extra = {} if cfg.eps is None else {"eps": cfg.eps}
    name = cfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if name == "lars":
        return lb.LARS(groups, lr=lr, momentum=cfg.momentum, eta=eta, nesterov=cfg.nesterov,
                       trust_clip=cfg.trust_clip, **extra)
    if name == "lamb":
        return lb.LAMB(groups, lr=lr, betas=cfg.betas, max_trust=cfg.max_trust, **extra)
    if name == "tvlars":
        return lb.TVLARS(groups, lr=lr, momentum=cfg.momentum, eta=eta, lam=cfg.tvlars_lam, alpha=cfg.tvlars_alpha,
                         delay=tvlars_delay_steps(cfg, spe), gamma_min=cfg.tvlars_gamma_min, **extra)
    if name == "lalc":
        return lb.LALC(groups, lr=lr, momentum=cfg.momentum, eta=eta, nesterov=cfg.nesterov, **extra)
    if name == "clars":
        if not hasattr(lb, "CLARS"):
            raise ValueError("optimizer: clars is not available in this version of largebatch.optim")
        # The loop back-propagates sum_i f_i / rows_per_step: "sum" reduction, scale set per step.
        return lb.CLARS(groups, lr=lr, momentum=cfg.momentum, eta=eta, model=model,
                        persample_subset=cfg.clars_subset, loss_reduction="sum", **extra)
    raise ValueError(f"optimizer: {name!r} is not one of {', '.join(config_mod.OPTIMIZERS)}")


def effective_lr(cfg: TrainConfig) -> float:
    """Peak LR after the scaling rule (SPEC "Scaling rules")."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    from largebatch.schedules import scale_lr

    return float(scale_lr(cfg.lr, cfg.batch_size, cfg.base_batch_size, rule=cfg.lr_scaling))


def tvlars_delay_steps(cfg: TrainConfig, spe: int) -> int:
    return int(round(cfg.tvlars_delay_epochs * spe))


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, spe: int):
    """LambdaLR over ``largebatch.schedules`` (``None`` for schedule 'none')."""
    if cfg.schedule == "none":
        return None
    from largebatch import schedules

    total = cfg.epochs * spe
    warm = int(round(cfg.warmup_epochs * spe))
    if cfg.schedule == "cosine":
        fn = schedules.warmup_cosine(total, warm, min_ratio=cfg.min_lr_ratio)
    else:
        fn = schedules.polynomial(total, warm, power=cfg.poly_power, end_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 12345) % (2**63))
    return g


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------- writers
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
    """Read a metrics table written by :class:`Table` (numbers come back as float/int)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        rows = list(csv.DictReader(f))
    return [{k: _num(v) for k, v in r.items()} for r in rows]


def _num(v: str) -> Any:
    for t in (int, float):
        try:
            return t(v)
        except (TypeError, ValueError):
            pass
    return v


METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_seconds", "images_per_s"]
STEP_COLUMNS = ["step", "epoch", "lr", "lr_eff", "loss"]
STAT_COLUMNS = ["step", "layer", "adapt", "w_norm", "g_norm", "lnr", "trust", "layer_lr"]


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, dataset: data_mod.ArrayDataset | None = None, *,
          log: Callable[[str], None] | None = None) -> RunResult:
    """Run (or resume) training as configured. ``dataset`` overrides ``cfg.dataset`` (demo, benchmarks)."""
    cfg.validate()
    t_start = time.perf_counter()
    info = dist_mod.setup(cfg.device)
    try:
        return _train(cfg, dataset, info, log or (print if info.is_main else (lambda s: None)), t_start)
    finally:
        dist_mod.cleanup(info)


def _train(cfg: TrainConfig, dataset, info: dist_mod.DistInfo, log, t_start: float) -> RunResult:
    device = info.device
    micro, accum = cfg.check_world_size(info.world_size)
    out = cfg.out_dir
    ckpt_path = os.path.join(out, "checkpoint.pt")
    resume_state = None
    if cfg.checkpoint and os.path.exists(ckpt_path):
        if not cfg.resume:
            raise ValueError(f"out_dir: {out} already holds a checkpoint; pass --resume to continue it "
                             f"or choose another --out-dir")
        resume_state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resume_config(cfg, resume_state["config"])
    elif cfg.resume:
        log(f"resume: no checkpoint in {out}; starting from scratch")

    # data (a batch larger than the data set is a config error: raised before anything is written)
    ds = dataset if dataset is not None else data_mod.load(cfg.dataset, cfg.data_dir, cfg.download)
    n_train = ds.train_x.shape[0]
    spe = steps_per_epoch(n_train, cfg.batch_size, info.world_size, cfg.drop_last)
    total_steps = cfg.epochs * spe
    ds = ds.to(device)
    augment = ds.augment_default if cfg.augment is None else cfg.augment
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        config_mod.save(cfg, os.path.join(out, "config.yaml"))

    # model + optimizer + schedule
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, ds.num_classes, ds.shape, stem=cfg.stem, mlp_depth=cfg.mlp_depth,
                        mlp_width=cfg.mlp_width, activation=cfg.activation, mlp_batchnorm=cfg.mlp_batchnorm)
    init_weights(model, cfg.init)
    model.to(device)
    if info.enabled and cfg.sync_bn:
        if device.type == "cpu":
            raise ValueError("sync_bn: SyncBatchNorm needs GPU (or XPU) devices; drop --sync-bn on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(cfg, model, spe)
    sched = build_scheduler(cfg, opt, spe)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    names = {id(p): n for n, p in model.named_parameters()}
    core = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    if resume_state is not None:
        core.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        if sched is not None:
            sched.load_state_dict(resume_state["scheduler"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        _set_rng(resume_state["rng"], device)
        start_epoch, global_step = resume_state["epoch"], resume_state["global_step"]
        history = resume_state["history"]
        log(f"resume: continuing {out} after epoch {start_epoch} (step {global_step})")

    fmt = cfg.metrics_format
    metrics_t = Table(os.path.join(out, "metrics"), fmt, METRIC_COLUMNS)
    steps_t = Table(os.path.join(out, "steps"), fmt, STEP_COLUMNS)
    stats_t = Table(os.path.join(out, "layer_stats"), fmt, STAT_COLUMNS)
    if info.is_main:
        metrics_t.rewrite(history)
        for t in (steps_t, stats_t):  # drop rows past the checkpoint (a run interrupted mid-epoch)
            t.rewrite([r for r in t.read() if r["step"] < global_step])
    tb = _tensorboard(out) if info.is_main else None

    log(f"train: {cfg.dataset if dataset is None else ds.name} ({n_train} train / {ds.test_x.shape[0]} test) "
        f"{cfg.model} {cfg.optimizer} lr {effective_lr(cfg):g} | global batch {cfg.batch_size} = micro {micro} "
        f"x accum {accum} x world {info.world_size} | {spe} steps/epoch, {total_steps} steps | {device}")

    autocast = _autocast(cfg.precision, device)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=global_step, disable=None if (cfg.progress and info.is_main) else True,
               dynamic_ncols=True, leave=False, file=sys.stderr)
    status, failure = "finished", None
    epochs_this_run = 0
    core.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            gen = _epoch_generator(cfg.seed, epoch, device)
            perm = torch.randperm(n_train, device=device, generator=gen)
            local = dist_mod.shard(perm, info.rank, info.world_size)
            rows_per_step = cfg.batch_size // info.world_size
            t_epoch = time.perf_counter()
            sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
            step_losses = torch.full((spe,), float("nan"), device=device)
            step_lrs: list[tuple[float, float]] = []
            stat_rows: list[tuple[int, torch.Tensor, list[int], torch.Tensor]] = []
            first_step_of_epoch = global_step
            for s in range(spe):
                idx = local[s * rows_per_step:(s + 1) * rows_per_step]
                count = idx.numel()
                chunks = idx.split(micro)
                step_loss = torch.zeros((), device=device)
                if cfg.optimizer == "clars":  # per-sample norms: hooks see (scale / count) * grad f_i
                    opt.persample.loss_scale = (scaler.get_scale() if scaler is not None else 1.0) / count
                for j, ch in enumerate(chunks):
                    x = ds.train_x[ch]
                    if augment:
                        x = data_mod.random_crop_flip(x, gen)
                    x = data_mod.normalize(x, ds.mean, ds.std)
                    y = ds.train_y[ch]
                    sync = (not info.enabled) or j == len(chunks) - 1
                    ctx = contextlib.nullcontext() if sync else model.no_sync()
                    with ctx:
                        with autocast:
                            logits = model(x)
                        loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
                        loss = loss_sum / count
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    ls = loss_sum.detach()
                    step_loss += ls
                    sums[0] += ls
                    sums[1] += (logits.detach().argmax(1) == y).sum()
                    sums[2] += ch.numel()
                step_losses[s] = step_loss / count
                lr_now = opt.param_groups[0]["lr"]
                step_lrs.append((lr_now, _lr_eff(cfg, opt, global_step, lr_now)))
                record = cfg.stats_every > 0 and global_step % cfg.stats_every == 0
                pre = _pre_step_norms(opt) if record and not hasattr(opt, "layer_stats") else None
                if record and hasattr(opt, "track_stats"):
                    opt.track_stats = True
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if record:
                    stat_rows.append((global_step, *_collect_stats(opt, pre)))
                    if hasattr(opt, "track_stats"):
                        opt.track_stats = False
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
                global_step += 1
                bar.update(1)
                if not bar.disable and (s % 10 == 0 or s == spe - 1):
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(step_losses[s]):.4f}", lr=f"{lr_now:.4g}")
                if (global_step % CHECK_EVERY == 0) or s == spe - 1:
                    bad = dist_mod.any_flag(~torch.isfinite(step_losses[: s + 1]).all(), info)
                    if bool(bad):
                        failure = _failure(step_losses[: s + 1], info, epoch, first_step_of_epoch, ckpt_path, cfg)
                        raise NonFiniteLoss(failure["message"])

            # ---- end of epoch: one host copy of everything recorded
            dist_mod.all_reduce_sum(sums, info)
            tr = sums.cpu().tolist()
            t_train = time.perf_counter() - t_epoch
            te_loss, te_acc = evaluate(model, ds, cfg.eval_batch_size, info, autocast)
            row = {"epoch": epoch + 1, "step": global_step, "lr": opt.param_groups[0]["lr"],
                   "train_loss": tr[0] / tr[2], "train_acc": tr[1] / tr[2], "test_loss": te_loss,
                   "test_acc": te_acc, "epoch_seconds": round(t_train, 4),
                   "images_per_s": round(tr[2] / t_train, 1)}
            history.append(row)
            if info.is_main:
                losses = step_losses.cpu().tolist()
                steps_t.append([{"step": first_step_of_epoch + i, "epoch": epoch + 1, "lr": lr, "lr_eff": le,
                                 "loss": losses[i]} for i, (lr, le) in enumerate(step_lrs)])
                stats_t.append(_stat_rows(stat_rows, names))
                metrics_t.rewrite(history)
                if tb is not None:
                    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
                        tb.add_scalar(k, row[k], epoch + 1)
                    tb.flush()
                if cfg.checkpoint:
                    _save_checkpoint(ckpt_path, core, opt, sched, scaler, cfg, epoch + 1, global_step, history, device)
            log(f"epoch {epoch + 1}/{cfg.epochs} step {global_step} | train loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.4f} | test loss {te_loss:.4f} acc {te_acc:.4f} | lr {row['lr']:.4g} | "
                f"{row['images_per_s']:.0f} img/s")
            epochs_this_run += 1
            if cfg.stop_after_epochs is not None and epochs_this_run >= cfg.stop_after_epochs \
                    and epoch + 1 < cfg.epochs:
                status = "stopped"
                log(f"stop: stopped after {epochs_this_run} epoch(s) as asked; continue with --resume")
                break
    except NonFiniteLoss as e:
        status = "nonfinite"
        log(f"error: {e}")
        if info.is_main:
            with open(os.path.join(out, "failure.json"), "w") as f:
                json.dump(failure, f, indent=2)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    return RunResult(status, out, len(history), global_step if status != "nonfinite" else failure["global_step"],
                     history, failure, time.perf_counter() - t_start, core)


@torch.no_grad()
def evaluate(model: nn.Module, ds: data_mod.ArrayDataset, batch: int, info: dist_mod.DistInfo,
             autocast=None) -> tuple[float, float]:
    """Mean test loss and accuracy, the test set split across ranks (each sample once), reduced."""
    core = _unwrap(model)
    was_training = core.training
    core.eval()
    n = ds.test_x.shape[0]
    idx = torch.arange(info.rank, n, info.world_size, device=ds.test_x.device)
    sums = torch.zeros(3, device=ds.test_x.device, dtype=torch.float64)
    for ch in idx.split(batch):
        x = data_mod.normalize(ds.test_x[ch], ds.mean, ds.std)
        y = ds.test_y[ch]
        with (autocast or contextlib.nullcontext()):
            logits = core(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += ch.numel()
    dist_mod.all_reduce_sum(sums, info)
    core.train(was_training)
    s = sums.cpu().tolist()
    return s[0] / s[2], s[1] / s[2]


# ----------------------------------------------------------------------------- helpers
def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _lr_eff(cfg: TrainConfig, opt, step: int, lr: float) -> float:
    """Base LR actually applied at ``step`` (TVLARS: ``lr * phi(t)``, seed 000 eq. 8)."""
    if cfg.optimizer != "tvlars":
        return lr
    from largebatch.schedules import tvlars_phi

    g = opt.param_groups[0]
    return lr * tvlars_phi(step, lam=g["lam"], alpha=g["alpha"], delay=g["delay"], gamma_min=g["gamma_min"])


def _pre_step_norms(opt) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """For optimizers without ``layer_stats`` (torch SGD): norms before the step, trust 1, group LR."""
    params, lrs = [], []
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                params.append(p)
                lrs.append(g["lr"])
    wn = torch.stack(torch._foreach_norm([p.detach() for p in params])).float()
    gn = torch.stack(torch._foreach_norm([p.grad for p in params])).float()
    return params, wn, gn, torch.tensor(lrs, device=wn.device, dtype=torch.float32)


def _collect_stats(opt, pre) -> tuple[list[int], torch.Tensor]:
    """(param ids, [5, n] tensor of w_norm, g_norm, trust, lr, adapt) -- still on device."""
    if pre is not None:
        params, wn, gn, lr = pre
        adapt = torch.tensor([bool(next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                                   .get("adapt", True)) for p in params], device=wn.device, dtype=torch.float32)
        return [id(p) for p in params], torch.stack([wn, gn, torch.ones_like(wn), lr, adapt]).clone()
    st = opt.layer_stats()
    ids = [id(p) for p in st["params"]]
    return ids, torch.stack([st["w_norm"], st["g_norm"], st["trust"], st["lr"],
                             st["adapt"].to(st["w_norm"].dtype)]).float().clone()


def _stat_rows(stat_rows, names: dict[int, str]) -> list[dict[str, Any]]:
    if not stat_rows:
        return []
    host = torch.stack([t for _, _, t in stat_rows]).cpu().numpy() if len({t.shape for _, _, t in stat_rows}) == 1 \
        else [t.cpu().numpy() for _, _, t in stat_rows]
    rows = []
    for (step, ids, _), arr in zip(stat_rows, host):
        for j, pid in enumerate(ids):
            wn, gn, tr, lr, ad = (float(v) for v in arr[:, j])
            rows.append({"step": step, "layer": names.get(pid, f"param{j}"), "adapt": int(ad),
                         "w_norm": wn, "g_norm": gn, "lnr": wn / gn if gn > 0 else float("nan"),
                         "trust": tr, "layer_lr": lr})
    return rows


def _failure(step_losses: torch.Tensor, info, epoch: int, first_step: int, ckpt: str, cfg: TrainConfig) -> dict:
    losses = step_losses.detach().float().reshape(1, -1).clone()
    bad = (~torch.isfinite(losses)).float()
    dist_mod.all_reduce_sum(bad, info)
    i = int(torch.nonzero(bad[0] > 0)[0, 0])
    have = cfg.checkpoint and os.path.exists(ckpt)
    msg = (f"non-finite training loss ({float(losses[0, i])}) at epoch {epoch + 1}, step {i + 1} of the epoch "
           f"(global step {first_step + i}); training stopped. "
           + (f"The last good checkpoint is {ckpt} (epoch {torch.load(ckpt, map_location='cpu', weights_only=False)['epoch']})."
              if have else "No checkpoint was written before it.")
           + " Try a lower --lr, a longer --warmup-epochs or another optimizer.")
    return {"message": msg, "epoch": epoch + 1, "step_in_epoch": i + 1, "global_step": first_step + i,
            "loss": str(float(losses[0, i])), "checkpoint": ckpt if have else None}


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


def _save_checkpoint(path, model, opt, sched, scaler, cfg, epoch, global_step, history, device) -> None:
    """Atomic: write ``path.tmp`` then ``os.replace`` (a crash leaves the previous checkpoint intact)."""
    state = {"epoch": epoch, "global_step": global_step, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None, "rng": _rng_state(device),
             "config": cfg.to_dict(), "history": history}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    now = cfg.to_dict()
    for k, v in saved.items():
        if k in config_mod.RESUME_MUTABLE:
            continue
        if k in now and now[k] != v:
            raise ValueError(f"{k}: differs from the checkpointed run ({v!r} there, {now[k]!r} now); "
                             f"resume with the same configuration")
