"""Cost of measuring the gradient noise scale (largebatch.noise_scale) on top of a training step.

One step = forward + backward of each micro-batch (gradient accumulation, ``--accum`` micro-batches
of ``--batch / --accum`` rows, loss ``sum / batch``), then an SGD-with-momentum step and
``zero_grad``. Modes, interleaved in rounds (each round runs every mode once, in turn):

* ``plain``: the step alone;
* ``two_batch``: with :class:`MicroBatchNorms` (estimator (a): after each micro-batch one
  subtraction, one norm per tensor and, except after the last, one copy of the gradients; then
  ``measure()``: one more norm per tensor);
* ``per_sample``: with :class:`PerSampleNorms` (estimator (b), exact per-sample norms), for reference.

Under DDP estimator (a) reads each rank's bucket in a communication hook (one norm per tensor,
no copy): less work than ``two_batch`` here. Reported: median step time over rounds and the
median over rounds of each mode's time relative to ``plain`` in the same round (steadier when
other processes share the CPU); and the estimator's own operations timed alone (20 steps' worth
per round, gradients in place, no forward/backward) as a share of the median plain step: the
overhead it adds, robust to a noisy machine. Models: CIFAR ResNet-20 (32x32x3 inputs) and the MLP of the
harness (3 x 256, BatchNorm) on 8x8 digits-sized inputs.

    python benchmarks/noise_scale_overhead.py [--rounds 9] [--batch 128] [--accum 2] [--threads 2]
    nice python benchmarks/noise_scale_overhead.py --threads 1 --clock cpu     # on a shared machine
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from largebatch import noise_scale as ns
from largebatch.experiments.engine import cpu_model
from largebatch.models import build_model




def make(model_name: str, batch: int, device: torch.device):
    shape = (3, 32, 32) if model_name != "mlp" else (1, 8, 8)
    torch.manual_seed(0)
    model = build_model(model_name, 10, shape).to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def step_fn(model, x, y, accum: int, mode: str):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    b = x.shape[0]
    micro = b // accum
    meter = None
    if mode == "two_batch":
        meter = ns.MicroBatchNorms(params, b_small=micro, b_big=b)
    elif mode == "per_sample":
        meter = ns.PerSampleNorms(model, b_big=b)
        meter.loss_scale = 1.0 / b

    def step():
        for j in range(accum):
            sl = slice(j * micro, (j + 1) * micro)
            (F.cross_entropy(model(x[sl]), y[sl], reduction="sum") / b).backward()
            if mode == "two_batch":
                meter.micro_batch_done(b / micro, last=j == accum - 1)
        if meter is not None:
            meter.measure()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, meter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet20,mlp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU seconds of this process (steadier on a shared machine; use with --threads 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__} | {cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)} "
          f"| {args.threads} threads, {args.clock} clock | batch {args.batch} = {args.accum} micro-batches "
          f"| {args.rounds} rounds")
    modes = ("plain", "two_batch", "per_sample")
    for name in args.models.split(","):
        model, x, y = make(name, args.batch, device)
        # per_sample's hooks on a copy of the model: the other modes run without them
        fns = {m: step_fn(copy.deepcopy(model) if m == "per_sample" else model, x, y, args.accum, m) for m in modes}
        times = {m: [] for m in modes}
        for m in modes:  # warm-up
            fns[m][0]()
        for _ in range(args.rounds):
            for m in modes:
                sync()
                t0 = clock()
                fns[m][0]()
                sync()
                times[m].append(clock() - t0)
        # the estimator's own work alone (gradients in place, no forward/backward): many repetitions,
        # robust to a noisy machine; its ratio to the plain step is the overhead it adds
        meter = fns["two_batch"][1]
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        alone = []
        for _ in range(args.rounds):
            sync()
            t0 = clock()
            for _ in range(20):
                for j in range(args.accum):
                    meter.micro_batch_done(float(args.accum), last=j == args.accum - 1)
                meter.measure()
            sync()
            alone.append((clock() - t0) / 20)
        model.zero_grad(set_to_none=True)
        print(f"\n{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{len(meter.params)} tensors)")
        print(f"{'mode':<12}{'median ms':>11}{'paired x':>10}{'overhead':>10}")
        for m in modes:
            ratio = statistics.median(t / p for t, p in zip(times[m], times["plain"]))
            print(f"{m:<12}{1e3 * statistics.median(times[m]):>11.1f}{ratio:>10.3f}{100 * (ratio - 1):>9.1f}%")
        est, plain = statistics.median(alone), statistics.median(times["plain"])
        print(f"two_batch estimator alone: {1e3 * est:.2f} ms per step = {100 * est / plain:.2f}% of the plain step")


if __name__ == "__main__":
    main()
