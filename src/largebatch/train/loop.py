"""The training loop: one optimizer step per global batch, diagnostics without per-step host syncs.

Batch arithmetic: ``global batch = micro-batch x accumulation steps x world size``.
Each process draws its share of an epoch's permutation (``distributed.shard``), splits its
``batch_size / world_size`` rows of a step into micro-batches, and back-propagates
``sum of per-sample losses / rows of this step``; DDP's gradient average over ranks (or FSDP2's
reduce-scatter, ``--fsdp``: ``fsdp.py``) then yields the gradient of the mean loss over the global
batch (docs/algorithms.md: ``g`` is the global-batch gradient), whatever the accumulation. Gradients
are reduced once per step (``fsdp.grad_sync`` on the other micro-batches).

Step counting: ``steps_per_epoch = floor(ceil(N / world) / (B / world))`` (``drop_last``, the
default) or the ceiling. Warm-up epochs, TVLARS's delay ``d_e`` (in optimizer steps,
docs/algorithms.md) and the schedule length are converted with this one number:
``round(epochs * steps_per_epoch)`` (``factory.py``).

Host syncs: the loop only copies device tensors to the host at the end of an epoch (metrics,
per-step losses, recorded layer statistics) and every ``CHECK_EVERY`` steps (a single bool: did a
loss turn non-finite), plus the progress bar's loss when a terminal shows it. The gradient noise scale
(``--noise-scale``, ``noise.py``) keeps its per-step norms on the device until that copy too.

Runs are resumable exactly: the data order and augmentation of epoch ``e`` come from a generator
seeded with ``(seed, e)``; the checkpoint written (atomically) after each epoch holds model,
optimizer, scheduler, GradScaler, RNG states and the metric history (``rundir.py``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.optim import registry

from . import data as data_mod
from . import distributed as dist_mod
from . import fsdp
from . import noise as noise_mod
from .config import TrainConfig
from .diagnostics import LayerStatsRecorder
from .evaluate import autocast_for, evaluate
from .factory import build_optimizer, build_scheduler, effective_lr, lr_applied, steps_per_epoch
from ..models import build_model, init_weights
from .rundir import METRIC_COLUMNS, RunDir, RunDirError, first_line

CHECK_EVERY = 50  # steps between the (one-bool) checks for a non-finite loss


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
    """A training loss turned non-finite; ``failure`` is the record written to ``failure.json``."""

    def __init__(self, message: str, failure: dict[str, Any] | None = None):
        super().__init__(message)
        self.failure = failure


@dataclass
class _Setup:
    """What every step of a run uses, built once by :func:`_build`."""
    cfg: TrainConfig
    info: dist_mod.DistInfo
    ds: data_mod.ArrayDataset  # on the device
    spe: int  # optimizer steps per epoch
    micro: int  # micro-batch rows per rank
    model: nn.Module  # what runs forward: DDP-wrapped when distributed
    core: nn.Module  # the bare model: checkpoints, RunResult.model
    opt: torch.optim.Optimizer
    sched: Any  # LambdaLR or None
    scaler: Any  # GradScaler (fp16) or None
    names: dict[int, str]  # id(param) -> parameter name, for the layer statistics
    autocast: Any  # the forward pass's context
    persample: bool  # the optimizer measures per-sample statistics (CLARS): set its loss scale
    task: "Task"
    noise: Any = None  # --noise-scale: train/noise.RunNoiseScale


@dataclass
class _Epoch:
    """What one epoch leaves on the device until its single host copy."""
    first_step: int
    t0: float
    sums: torch.Tensor  # the task's running sums (classification: loss sum, correct, count)
    step_losses: torch.Tensor  # mean loss of each step (NaN for steps not run)
    stats: LayerStatsRecorder
    step_lrs: list[tuple[float, float]] = field(default_factory=list)  # (lr, lr_eff) of each step

    @property
    def end_step(self) -> int:
        return self.first_step + len(self.step_lrs)


# ----------------------------------------------------------------------------- tasks
class Task:
    """What a run learns; the loop around it (steps, diagnostics, checkpoints, resume, DDP, the
    non-finite stop) is the same for all. :class:`Classification` is the reference; Barlow Twins
    pre-training (``train/pretrain.py``) is the other."""

    name = "train"
    metric_columns = METRIC_COLUMNS  # the metrics table: epoch, step, lr, <metrics()>, epoch_seconds, images_per_s
    sums_size = 3  # device sums an epoch accumulates; the last one counts the images
    fsdp_methods: tuple[str, ...] = ()  # model methods besides forward that run it (``fsdp.shard_model``)

    def check(self, cfg: TrainConfig) -> None:
        """Refuse (``ValueError``) what the task cannot do with ``cfg``."""

    def build_model(self, cfg: TrainConfig, ds: data_mod.ArrayDataset) -> nn.Module:
        raise NotImplementedError

    def prepare(self, model: nn.Module, cfg: TrainConfig, info: dist_mod.DistInfo) -> nn.Module:
        """The model the optimizer sees (e.g. with SyncBatchNorm), before the optimizer is built."""
        return model

    def wrap(self, model: nn.Module, info: dist_mod.DistInfo) -> nn.Module:
        """What runs forward (DDP-wrapped under data parallelism; not called under ``--fsdp``)."""
        if not info.enabled:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    def step_gradients(self, setup: _Setup, idx: torch.Tensor, gen: torch.Generator,
                       sums: torch.Tensor) -> torch.Tensor:
        """Gradients of one optimizer step over this rank's rows ``idx``; adds to ``sums``; returns
        the step's loss (a device scalar)."""
        raise NotImplementedError

    def metrics(self, setup: _Setup, sums: list[float], epoch: int) -> dict[str, float]:
        """The epoch's metric fields from the reduced ``sums`` (and any evaluation)."""
        raise NotImplementedError

    def summary(self, row: dict[str, Any]) -> str:
        return " | ".join(f"{k} {row[k]:.4f}" for k in self.metric_columns[3:-2])


class Classification(Task):
    """Supervised training: cross-entropy of a classifier, test loss and accuracy each epoch."""

    def build_model(self, cfg: TrainConfig, ds: data_mod.ArrayDataset) -> nn.Module:
        model = build_model(cfg.model, ds.num_classes, ds.shape, stem=cfg.stem, mlp_depth=cfg.mlp_depth,
                            mlp_width=cfg.mlp_width, activation=cfg.activation, mlp_batchnorm=cfg.mlp_batchnorm)
        init_weights(model, cfg.init)
        return model

    def prepare(self, model: nn.Module, cfg: TrainConfig, info: dist_mod.DistInfo) -> nn.Module:
        if info.enabled and cfg.sync_bn:
            if info.device.type == "cpu":
                raise ValueError("sync_bn: SyncBatchNorm needs GPU (or XPU) devices; drop --sync-bn on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def step_gradients(self, setup: _Setup, idx: torch.Tensor, gen: torch.Generator,
                       sums: torch.Tensor) -> torch.Tensor:
        """Gradients of ``sum of losses / rows`` over this step's rows ``idx``, one micro-batch at a
        time (DDP all-reduces on the last one only). Adds to ``sums``; returns the step's mean loss."""
        cfg, ds, model, scaler = setup.cfg, setup.ds, setup.model, setup.scaler
        augment = ds.augment_default if cfg.augment is None else cfg.augment
        count = idx.numel()
        chunks = idx.split(setup.micro)
        step_loss = torch.zeros((), device=setup.info.device)
        if setup.persample:  # per-sample norms: hooks see (1 / count) * grad f_i (the GradScaler's
            # scale is divided out inside step(): unscale_persample, set in _build)
            setup.opt.persample.loss_scale = 1.0 / count
        if setup.noise is not None:
            setup.noise.begin_step(count)
        for j, ch in enumerate(chunks):
            x = ds.train_x[ch]
            if augment:
                x = data_mod.random_crop_flip(x, gen)
            x = data_mod.normalize(x, ds.mean, ds.std)
            y = ds.train_y[ch]
            with fsdp.grad_sync(model, j == len(chunks) - 1):
                with setup.autocast:
                    logits = model(x)
                loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
                loss = loss_sum / count
                (scaler.scale(loss) if scaler is not None else loss).backward()
            if setup.noise is not None:
                setup.noise.micro_batch_done(ch.numel(), count, j == len(chunks) - 1)
            ls = loss_sum.detach()
            step_loss += ls
            sums[0] += ls
            sums[1] += (logits.detach().argmax(1) == y).sum()
            sums[2] += ch.numel()
        return step_loss / count

    def metrics(self, setup: _Setup, sums: list[float], epoch: int) -> dict[str, float]:
        te_loss, te_acc = evaluate(setup.model, setup.ds, setup.cfg.eval_batch_size, setup.info, setup.autocast)
        return {"train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2], "test_loss": te_loss,
                "test_acc": te_acc}

    def summary(self, row: dict[str, Any]) -> str:
        return (f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}")


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, dataset: data_mod.ArrayDataset | None = None, *,
          log: Callable[[str], None] | None = None, task: "Task | None" = None) -> RunResult:
    """Run (or resume) training as configured. ``dataset`` overrides ``cfg.dataset`` (demo, benchmarks);
    ``task`` is what is learned (default :class:`Classification`; ``largebatch pretrain``: Barlow Twins)."""
    cfg.validate()
    task = task or Classification()
    t_start = time.perf_counter()
    info = dist_mod.setup(cfg.device)
    try:
        return _train(cfg, dataset, info, log or (print if info.is_main else (lambda s: None)), t_start, task)
    finally:
        dist_mod.cleanup(info)


def _train(cfg: TrainConfig, dataset, info: dist_mod.DistInfo, log, t_start: float, task: "Task") -> RunResult:
    micro, accum = cfg.check_world_size(info.world_size)
    task.check(cfg)
    if cfg.noise_scale:
        if not isinstance(task, Classification):
            raise ValueError(f"noise_scale: not supported by {task.name}; drop --noise-scale")
        noise_mod.method_for(cfg, info.world_size, accum)
    run = RunDir(cfg.out_dir, cfg.metrics_format, info.is_main,
                 task.metric_columns + ([noise_mod.METRIC_COLUMN] if cfg.noise_scale else []), sharded=cfg.fsdp,
                 command=task.name)
    if cfg.noise_scale:
        run.steps.columns = run.steps.columns + noise_mod.STEP_COLUMNS
    resume_state = run.inspect(cfg, log)  # reads only: a refusal leaves the directory as it was
    if resume_state is not None and resume_state["epoch"] > cfg.epochs:
        raise ValueError(f"epochs: the run in {cfg.out_dir} already completed {resume_state['epoch']} epochs; "
                         f"pass --epochs {resume_state['epoch']} or more")

    # data, model and optimizer (a bad data file, a batch larger than the data set or a model too
    # big for memory is a user error raised before anything is written)
    ds = dataset if dataset is not None else data_mod.load(cfg.dataset, cfg.data_dir, cfg.download)
    n_train = ds.train_x.shape[0]
    spe = steps_per_epoch(n_train, cfg.batch_size, info.world_size, cfg.drop_last)
    total_steps = cfg.epochs * spe
    ds = data_mod.with_normalization(ds.to(info.device), cfg.normalize)
    setup = _build(cfg, ds, info, spe, micro, task)
    history, start_epoch, global_step = [], 0, 0
    if resume_state is not None:  # before anything is written: a checkpoint that does not fit changes nothing
        start_epoch, global_step, history = run.restore(resume_state, setup.core, setup.opt, setup.sched,
                                                        setup.scaler, info.device)
        if start_epoch >= cfg.epochs:
            log(f"resume: the run in {cfg.out_dir} is already complete ({start_epoch} of {cfg.epochs} epochs, "
                f"step {global_step}); nothing to do")
            return RunResult("finished", cfg.out_dir, len(history), global_step, history, None,
                             time.perf_counter() - t_start, setup.core)
    if cfg.noise_scale:
        setup.noise = noise_mod.RunNoiseScale(cfg, setup.model, setup.core, info.world_size, micro, accum)
    _on_rank0(info, lambda: run.create(cfg))

    from tqdm.auto import tqdm

    bar = None
    status, failure, epochs_this_run = "finished", None, 0
    try:
        if resume_state is not None:
            log(f"resume: continuing {cfg.out_dir} after epoch {start_epoch} (step {global_step})")
        run.open(history, global_step)
        if setup.noise is not None:
            setup.noise.open(history, global_step, info.is_main)
        log(f"{task.name}: {cfg.dataset if dataset is None else ds.name} ({n_train} train / {ds.test_x.shape[0]} test) "
            f"{cfg.model} {cfg.optimizer} lr {effective_lr(cfg):g} | global batch {cfg.batch_size} = micro {micro} "
            f"x accum {accum} x world {info.world_size} | {spe} steps/epoch, {total_steps} steps | {info.device}")
        bar = tqdm(total=total_steps, initial=global_step,
                   disable=None if (cfg.progress and info.is_main) else True,
                   dynamic_ncols=True, leave=False, file=sys.stderr)
        setup.core.train()
        for epoch in range(start_epoch, cfg.epochs):
            ep = _train_epoch(setup, run, epoch, global_step, bar)
            global_step = ep.end_step
            row = _end_epoch(setup, run, ep, epoch, history)
            log(f"epoch {epoch + 1}/{cfg.epochs} step {global_step} | {task.summary(row)} | "
                f"{_lr_text(row['lr'], ep.step_lrs)} | {row['images_per_s']:.0f} img/s")
            epochs_this_run += 1
            if cfg.stop_after_epochs is not None and epochs_this_run >= cfg.stop_after_epochs \
                    and epoch + 1 < cfg.epochs:
                status = "stopped"
                log(f"stop: stopped after {epochs_this_run} epoch(s) as asked; continue with --resume")
                break
    except NonFiniteLoss as e:
        status, failure = "nonfinite", e.failure
        log(f"error: {e}")
        run.write_failure(failure)
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return RunResult(status, cfg.out_dir, len(history),
                     global_step if status != "nonfinite" else failure["global_step"],
                     history, failure, time.perf_counter() - t_start, setup.core)


def _on_rank0(info: dist_mod.DistInfo, fn: Callable[[], None]) -> None:
    """Run ``fn`` (which acts on rank 0 only) and raise its ``ValueError`` (or ``RunDirError``) on
    every rank."""
    err = None
    try:
        fn()
    except (ValueError, RunDirError) as e:
        err = e
    if bool(dist_mod.any_flag(torch.tensor(err is not None, device=info.device), info)):
        raise err or ValueError("rank 0 could not prepare the run directory (see its message)")


def _build(cfg: TrainConfig, ds: data_mod.ArrayDataset, info: dist_mod.DistInfo, spe: int, micro: int,
           task: "Task") -> _Setup:
    """The task's model (seeded), optimizer, schedule and GradScaler; the model wrapped for data
    parallelism as the task says (DDP for classification)."""
    device = info.device
    torch.manual_seed(cfg.seed)
    try:
        model = task.build_model(cfg, ds).to(device)
    except RuntimeError as e:  # torch.OutOfMemoryError is one too
        if "memory" not in str(e).lower():
            raise
        n = cfg.model if cfg.model != "mlp" else f"mlp (width {cfg.mlp_width}, depth {cfg.mlp_depth})"
        raise ValueError(f"model: {n} does not fit in memory on {device} ({first_line(e)}); "
                         f"choose a smaller model or another --device") from None
    model = task.prepare(model, cfg, info)
    if cfg.fsdp:  # parameters become DTensor shards before the optimizer sees them
        model = fsdp.shard_model(model, info, cfg.fsdp_param_dtype, task.fsdp_methods)
    opt = build_optimizer(cfg, model, spe)
    if registry.get(cfg.optimizer).persample:  # CLARS: no get_scale() host sync for its loss scale
        opt.unscale_persample = True
    sched = build_scheduler(cfg, opt, spe)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    names = {id(p): n for n, p in model.named_parameters()}
    return _Setup(cfg, info, ds, spe, micro, model if cfg.fsdp else task.wrap(model, info), model, opt, sched,
                  scaler, names,
                  autocast=autocast_for(cfg.precision, device),
                  persample=registry.get(cfg.optimizer).persample, task=task)


# ----------------------------------------------------------------------------- one epoch
def _train_epoch(setup: _Setup, run: RunDir, epoch: int, global_step: int, bar) -> _Epoch:
    """``spe`` optimizer steps over this rank's share of the epoch's permutation."""
    cfg, info, device = setup.cfg, setup.info, setup.info.device
    gen = _epoch_generator(cfg.seed, epoch, device)
    perm = torch.randperm(setup.ds.train_x.shape[0], device=device, generator=gen)
    local = dist_mod.shard(perm, info.rank, info.world_size)
    rows_per_step = cfg.batch_size // info.world_size
    ep = _Epoch(first_step=global_step, t0=time.perf_counter(),
                sums=torch.zeros(setup.task.sums_size, device=device, dtype=torch.float64),
                step_losses=torch.full((setup.spe,), float("nan"), device=device),
                stats=LayerStatsRecorder(setup.opt, cfg.stats_every))
    for s in range(setup.spe):
        idx = local[s * rows_per_step:(s + 1) * rows_per_step]
        ep.step_losses[s] = setup.task.step_gradients(setup, idx, gen, ep.sums)
        if setup.noise is not None:
            setup.noise.end_step()
        lr_now = setup.opt.param_groups[0]["lr"]
        ep.step_lrs.append((lr_now, lr_applied(setup.opt, global_step)))
        _optimizer_step(setup, ep.stats, global_step)
        global_step += 1
        bar.update(1)
        if not bar.disable and (s % 10 == 0 or s == setup.spe - 1):
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(ep.step_losses[s]):.4f}", lr=f"{lr_now:.4g}")
        if (global_step % CHECK_EVERY == 0) or s == setup.spe - 1:
            bad = dist_mod.any_flag(~torch.isfinite(ep.step_losses[: s + 1]).all(), info)
            if bool(bad):
                failure = run.failure_record(ep.step_losses[: s + 1], info, epoch, ep.first_step, cfg)
                raise NonFiniteLoss(failure["message"], failure)
    return ep


def _optimizer_step(setup: _Setup, stats: LayerStatsRecorder, global_step: int) -> None:
    """Update (through the GradScaler in fp16: the layer-wise optimizers unscale and skip inside their
    step, without a host sync; docs/optimizers.md), record layer statistics, clear gradients, advance
    the schedule."""
    opt, scaler = setup.opt, setup.scaler
    stats.before_step(global_step)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    stats.after_step()
    opt.zero_grad(set_to_none=True)
    if setup.sched is not None:
        setup.sched.step()


def _lr_text(lr: float, step_lrs: list[tuple[float, float]]) -> str:
    """The epoch line's LR: the group's ``lr``, and the LR applied at the epoch's last step where
    the optimizer scales it in time (TVLARS: ``lr x phi(t)``), as ``lr.png`` shows both."""
    last, applied = step_lrs[-1] if step_lrs else (lr, lr)
    if abs(applied - last) <= 1e-12 * max(abs(last), 1e-30):
        return f"lr {lr:.4g}"
    return f"lr {lr:.4g}, applied lr x phi(t) {applied:.4g}"


def _end_epoch(setup: _Setup, run: RunDir, ep: _Epoch, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One host copy of everything the epoch recorded, test evaluation, the metrics row (appended
    to ``history``); rank 0 writes the tables and the checkpoint."""
    cfg, info = setup.cfg, setup.info
    dist_mod.all_reduce_sum(ep.sums, info)
    if cfg.fsdp:  # FSDP leaves each rank its own BatchNorm statistics: evaluate and save rank 0's
        fsdp.broadcast_buffers(setup.core, info)
    sums = ep.sums.cpu().tolist()
    t_train = time.perf_counter() - ep.t0
    metrics = setup.task.metrics(setup, sums, epoch)
    te_loss = metrics.get("test_loss", 0.0)
    if not math.isfinite(te_loss):
        failure = run.test_failure(te_loss, epoch, ep.end_step, cfg)
        raise NonFiniteLoss(failure["message"], failure)
    row = {"epoch": epoch + 1, "step": ep.end_step, "lr": setup.opt.param_groups[0]["lr"], **metrics,
           "epoch_seconds": round(t_train, 4), "images_per_s": round(sums[-1] / t_train, 1)}
    losses = ep.step_losses.cpu().tolist() if info.is_main else []
    step_rows = [{"step": ep.first_step + i, "epoch": epoch + 1, "lr": lr, "lr_eff": le, "loss": losses[i]}
                 for i, (lr, le) in enumerate(ep.step_lrs)] if info.is_main else None
    if setup.noise is not None:  # every rank (one collective): noise columns of the steps and the row
        noise_rows = setup.noise.end_epoch(ep.first_step, epoch, step_rows, row)
    history.append(row)
    if info.is_main:
        run.write_epoch(history, step_rows, ep.stats.rows(setup.names))
        if setup.noise is not None:
            setup.noise.write(noise_rows)
    if cfg.checkpoint:  # rank 0 writes (--fsdp: every rank writes its shards)
        run.save_checkpoint(setup.core, setup.opt, setup.sched, setup.scaler, cfg, epoch + 1, ep.end_step,
                            history, info.device)
    return row


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + 12345) % (2**63))
    return g
