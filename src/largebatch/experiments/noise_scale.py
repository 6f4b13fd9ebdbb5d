"""``largebatch noise-scale``: the gradient noise scale ``B_simple`` at initialisation and over a
short run, printed as the estimated critical batch size (McCandlish et al. 2018; docs/batch-size.md).

Takes the flags of ``largebatch train`` (data set, model, optimizer, batch size, ...) plus
``--steps``. At initialisation ``--init-batches`` batches are measured without updating the model
(the mean of their unbiased estimates); then ``--steps`` optimizer steps are run, with the EMAs of
the numerator and denominator smoothed as in ``largebatch train --noise-scale``. The estimator
follows ``--noise-scale-method``: ``two_batch`` needs ``--micro-batch-size`` below the batch;
``auto`` takes it then, exact per-sample norms otherwise. One process; nothing is written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.cli import add_arguments as train_arguments

    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the short run (default: 100)")
    parser.add_argument("--init-batches", type=int, default=8,
                        help="batches measured at initialisation, without updates (default: 8)")
    parser.add_argument("--every", type=int, default=10, help="print every k steps (default: 10)")
    train_arguments(parser)


def measure(cfg, steps: int, init_batches: int, every: int = 10,
            log: Callable[[str], None] = print, dataset=None) -> dict[str, Any]:
    """Run the measurement; returns ``{"init": NoiseScale, "curve": [(step, B_simple, loss)],
    "final": NoiseScale, "method", "b_small", "b_big", "seconds"}``."""
    import torch
    import torch.nn.functional as F

    from .. import noise_scale as ns
    from ..train import data as data_mod
    from ..train.distributed import pick_device
    from ..train.factory import build_single_process, steps_per_epoch
    from ..train.noise import method_for, per_sample_meter

    for name, v, lo in (("steps", steps, 0), ("init_batches", init_batches, 1), ("every", every, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: must be an integer >= {lo}, got {v!r}")
    micro, accum = cfg.check_world_size(1)
    method = method_for(cfg, 1, accum)
    device = pick_device(cfg.device)
    ds = (dataset if dataset is not None else data_mod.load(cfg.dataset, cfg.data_dir, cfg.download)).to(device)
    b = cfg.batch_size
    spe = steps_per_epoch(ds.train_x.shape[0], b, 1, cfg.drop_last)
    model, opt, sched = build_single_process(cfg, ds, device, spe)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if method == "per_sample":
        meter = per_sample_meter(model, b, [p for _, p in named])
        meter.loss_scale = 1.0 / b
    else:
        meter = ns.MicroBatchNorms([p for _, p in named], [n for n, _ in named], b_small=micro, b_big=b)
    augment = ds.augment_default if cfg.augment is None else cfg.augment
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = ds.train_x.shape[0]
    order = torch.randperm(n, device=device, generator=gen)
    pos = 0

    def gradients() -> float:
        nonlocal order, pos
        if pos + b > n:
            order, pos = torch.randperm(n, device=device, generator=gen), 0
        idx = order[pos:pos + b]
        pos += b
        total = torch.zeros((), device=device)
        chunks = idx.split(micro)
        for j, ch in enumerate(chunks):
            x = ds.train_x[ch]
            if augment:
                x = data_mod.random_crop_flip(x, gen)
            loss = F.cross_entropy(model(data_mod.normalize(x, ds.mean, ds.std)), ds.train_y[ch], reduction="sum")
            (loss / b).backward()
            if isinstance(meter, ns.MicroBatchNorms):
                meter.micro_batch_done(b / ch.numel(), last=j == len(chunks) - 1)
            total += loss.detach()
        return float(total) / b

    t0 = time.perf_counter()
    try:
        tr = gsq = None
        for _ in range(init_batches):  # at initialisation: no update
            gradients()
            small, big = meter.measure()
            t, g = ns.unbiased_estimates(small, big, meter.b_small, meter.b_big)
            tr, gsq = (t, g) if tr is None else (tr + t, gsq + g)
            opt.zero_grad(set_to_none=True)
        init = ns.NoiseScale(meter.names, (tr / init_batches).tolist(), (gsq / init_batches).tolist())
        log(f"noise scale of {cfg.model} on {ds.name}: {method} estimator (B_small {meter.b_small}, "
            f"B_big {meter.b_big}), {cfg.optimizer} lr {opt.param_groups[0]['lr']:g}")
        log(f"at initialisation ({init_batches} batches of {b}, no update): B_simple = {init.value:.4g}  "
            f"(tr Sigma = {math.fsum(init.trace):.4g}, |G|^2 = {math.fsum(init.gsq):.4g})")
        ema = ns.NoiseScaleEMA(cfg.noise_scale_ema)
        curve = []
        for s in range(steps):
            loss = gradients()
            small, big = meter.measure()
            ema.update(*ns.unbiased_estimates(small, big, meter.b_small, meter.b_big))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            value = float(ema.value())
            curve.append((s + 1, value, loss))
            if not math.isfinite(loss):
                raise ValueError(f"lr: the loss turned non-finite at step {s + 1}; lower --lr")
            if (s + 1) % every == 0 or s + 1 == steps:
                log(f"step {s + 1:>5}  loss {loss:.4f}  B_simple (EMA) {value:.4g}")
        final = ema.result(meter.names) if steps else init
    finally:
        meter.remove()
    return {"init": init, "curve": curve, "final": final, "method": method, "b_small": meter.b_small,
            "b_big": meter.b_big, "seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> int:
    from ..train.cli import config_from_args

    try:
        cfg = config_from_args(args)
        res = measure(cfg, args.steps, args.init_batches, args.every)
    except (ValueError, FileNotFoundError) as e:
        print(f"largebatch noise-scale: {e}", file=sys.stderr)
        return 2
    init, final = res["init"], res["final"]
    print(f"estimated critical batch size B_crit ~ B_simple: {init.value:.0f} at initialisation, "
          f"{final.value:.0f} after {args.steps} steps (batch size used: {cfg.batch_size}; {res['seconds']:.1f} s)")
    print("per tensor after the run (tr Sigma_k / |G_k|^2; the whole model is the ratio of the sums):")
    for name, v in final.layers.items():
        print(f"  {name:<40} {v:.4g}")
    return 0
