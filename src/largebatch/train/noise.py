"""``largebatch train --noise-scale``: the gradient noise scale of every step of a run.

The meter (:mod:`largebatch.noise_scale`) is chosen by ``noise_scale_method``: ``two_batch``
compares the micro-batches of gradient accumulation in one process, or each rank's local gradient
with the all-reduced one under DDP (a communication hook, no extra collective per step);
``per_sample`` uses exact per-sample gradient norms; ``auto`` takes ``two_batch`` where there are
two batch sizes and ``per_sample`` otherwise. Each step leaves ``[2, P]`` squared norms on the
device; at the end of the epoch one all-reduce averages the rank-local ones, and the host computes
the unbiased estimates and their EMAs (float64). The run then writes:

* ``steps``: ``noise_scale`` (smoothed ``B_simple``), ``noise_trace`` and ``noise_gsq`` (the smoothed
  ``tr(Sigma)`` and ``|G|^2`` of the whole model) of each step;
* ``metrics``: ``noise_scale`` at the end of each epoch;
* ``noise_scale.csv`` / ``.jsonl``: per parameter tensor at the end of each epoch (``trace``, ``gsq``,
  ``noise_scale``), whose sums give the whole-model value.

The EMA state travels in the metric history, so a resumed run continues it exactly.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import noise_scale as ns
from .rundir import Table

from .config import NOISE_SCALE_METHODS as METHODS
STEP_COLUMNS = ["noise_scale", "noise_trace", "noise_gsq"]
METRIC_COLUMN = "noise_scale"
LAYER_COLUMNS = ["step", "epoch", "layer", "trace", "gsq", "noise_scale"]
TABLE = "noise_scale"
STATE_KEY = "noise_state"  # the EMA state in the metric history (checkpointed, not written to the tables)


def method_for(cfg, world_size: int, accum: int) -> str:
    """The meter ``cfg`` asks for with ``world_size`` processes and ``accum`` micro-batches per step;
    ``ValueError`` naming the fields when it cannot run."""
    if cfg.noise_scale_method not in METHODS:
        raise ValueError(f"noise_scale_method: {cfg.noise_scale_method!r} is not one of {', '.join(METHODS)}")
    if cfg.fsdp:
        raise ValueError("noise_scale: not supported with --fsdp; use DDP (drop --fsdp)")
    if cfg.precision == "fp16":
        raise ValueError("noise_scale: the GradScaler's loss scale is not divided out of the norms; "
                         "use --precision bf16 or fp32")
    two = world_size > 1 or accum > 1
    method = cfg.noise_scale_method if cfg.noise_scale_method != "auto" else ("two_batch" if two else "per_sample")
    if method == "two_batch" and not two:
        raise ValueError("noise_scale_method: two_batch needs two batch sizes: set --micro-batch-size below the "
                         "per-process batch, run several processes (torchrun), or use per_sample")
    return method


def per_sample_meter(model: nn.Module, b_big: int, params) -> ns.PerSampleNorms:
    """:class:`~largebatch.noise_scale.PerSampleNorms`, with a model it cannot measure as a user error."""
    from ..persample import UnsupportedLayerError

    try:
        return ns.PerSampleNorms(model, b_big=b_big, params=params)
    except UnsupportedLayerError as e:
        why = str(e).split(" (supported")[0]
        raise ValueError(f"noise_scale_method: per_sample cannot measure this model ({why}); "
                         "use two_batch with --micro-batch-size below the batch") from None


class RunNoiseScale:
    """What ``--noise-scale`` adds to a run: the meter, the per-step records of an epoch, the EMA."""

    def __init__(self, cfg, model: nn.Module, core: nn.Module, world_size: int, micro: int, accum: int):
        self.method = method_for(cfg, world_size, accum)
        named = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
        rows_per_rank = cfg.batch_size // world_size
        if self.method == "per_sample":
            self.meter = per_sample_meter(core, cfg.batch_size, [p for _, p in named])
        elif world_size > 1:
            self.meter = ns.DDPLocalNorms(model, [p for _, p in named], [n for n, _ in named],
                                          b_small=rows_per_rank, b_big=cfg.batch_size)
        else:
            self.meter = ns.MicroBatchNorms([p for _, p in named], [n for n, _ in named], b_small=micro,
                                            b_big=rows_per_rank)
        self.micro_batches = isinstance(self.meter, ns.MicroBatchNorms)
        self.ema = ns.NoiseScaleEMA(cfg.noise_scale_ema)
        self.records: list[torch.Tensor] = []
        self.table = Table(os.path.join(cfg.out_dir, TABLE), cfg.metrics_format, LAYER_COLUMNS)

    # ------------------------------------------------------------------ each step (no host sync)
    def begin_step(self, rows: int) -> None:
        if isinstance(self.meter, ns.PerSampleNorms):  # the step's loss is sum / rows
            self.meter.loss_scale = 1.0 / rows

    def micro_batch_done(self, rows: int, step_rows: int, last: bool) -> None:
        if self.micro_batches:
            self.meter.micro_batch_done(step_rows / rows, last)

    def end_step(self) -> None:
        self.records.append(self.meter.measure())

    # ------------------------------------------------------------------ each epoch
    def end_epoch(self, first_step: int, epoch: int, step_rows: list[dict[str, Any]] | None,
                  row: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank: reduce the epoch's records (one collective), advance the EMA step by step, add
        the columns to ``step_rows`` (rank 0's) and ``row``; returns the per-tensor rows."""
        if not self.records:
            return []
        rec = torch.stack(self.records).to(torch.float64)  # [steps, 2, P]
        self.records = []
        rec[:, 0] = ns.average_over_ranks(rec[:, 0].contiguous())
        rec = rec.cpu()
        trace, gsq = ns.unbiased_estimates(rec[:, 0], rec[:, 1], self.meter.b_small, self.meter.b_big)
        for i in range(rec.shape[0]):
            self.ema.update(trace[i], gsq[i])
            if step_rows is not None:
                t, g = self.ema.trace.sum().item(), self.ema.gsq.sum().item()
                step_rows[i].update(noise_scale=t / g if g else float("nan"), noise_trace=t, noise_gsq=g)
        res = self.ema.result(self.meter.names)
        row[METRIC_COLUMN] = res.value
        row[STATE_KEY] = self.ema.state_dict()
        step = first_step + rec.shape[0]
        return [{"step": step, "epoch": epoch + 1, "layer": n, "trace": t, "gsq": g, "noise_scale": v}
                for n, t, g, v in zip(res.names, res.trace, res.gsq, res.layers.values())]

    def write(self, layer_rows: list[dict[str, Any]]) -> None:
        self.table.append(layer_rows)

    def open(self, history: list[dict[str, Any]], global_step: int, is_main: bool) -> None:
        """Continue a resumed run: the EMA as of its checkpoint; rank 0 drops table rows past it."""
        if history and STATE_KEY in history[-1]:
            self.ema.load_state_dict(history[-1][STATE_KEY])
        if is_main:
            self.table.rewrite([r for r in self.table.read() if r["step"] <= global_step])

    def remove(self) -> None:
        self.meter.remove()
