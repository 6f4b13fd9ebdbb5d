"""Cost of exact per-sample gradient norms (largebatch.persample) on top of forward+backward.

Measures, in one run, forward + backward of a CIFAR ResNet-18 (torchvision resnet18, 3x3
stem, no max-pool, 10 classes) and of an MLP with BatchNorm:

* ``plain``: ``loss.backward()`` only;
* ``persample``: with :class:`PerSampleGradNorms` attached to every trainable tensor, then
  ``collect()`` (norm sums of all tensors, BatchNorm and biases included);
* ``persample-clars``: attached to the tensors CLARS adapts (``ndim > 1``), as ``CLARS``
  does by default;
* ``opacus``: Opacus ``GradSampleModule`` (per-sample gradients materialized by its hooks)
  plus the per-sample norms computed from them, if Opacus is installed. Opacus refuses
  BatchNorm, so it runs on a BN-free variant (BatchNorm replaced by GroupNorm, Opacus's own
  recipe), measured against ``plain`` and ``persample`` on that same variant.

Time: median over interleaved rounds (each round runs every mode once, in turn), after
warm-up. Memory: peak of live bytes allocated through PyTorch's allocator during one
forward+backward, relative to the start (model, inputs and the previous step's tensors
excluded), from ``torch.profiler`` memory events on CPU or ``torch.cuda.max_memory_allocated``
on CUDA. Memory that bypasses PyTorch's allocator (oneDNN scratch space, if any) is not
counted.

    python benchmarks/persample_overhead.py [--rounds 5] [--batch 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from largebatch.persample import PerSampleGradNorms


def cifar_resnet18(norm=nn.BatchNorm2d) -> nn.Module:
    m = torchvision.models.resnet18(num_classes=10, norm_layer=norm)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def group_norm(c):
    return nn.GroupNorm(min(32, c), c)


def mlp_bn(norm=nn.BatchNorm1d) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), norm(1024), nn.ReLU(),
                         nn.Linear(1024, 512), norm(512), nn.ReLU(), nn.Linear(512, 10))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Mode:
    """One way of running forward+backward on its own copy of the model."""

    def __init__(self, name, model, x, y, device):
        self.name, self.x, self.y, self.device = name, x, y, device
        self.model = copy.deepcopy(model).to(device).train()
        self.tracker = None
        self.error = None
        if name == "persample":
            self.tracker = PerSampleGradNorms(self.model)
        elif name == "persample-clars":
            self.tracker = PerSampleGradNorms(self.model, params=[p for p in self.model.parameters() if p.ndim > 1])
        elif name == "opacus":
            from opacus import GradSampleModule
            from opacus.validators import ModuleValidator

            ModuleValidator.validate(self.model, strict=True)  # raises for BatchNorm
            for mod in self.model.modules():  # its full backward hooks forbid in-place ops
                if hasattr(mod, "inplace"):
                    mod.inplace = False
            self.model = GradSampleModule(self.model)

    def zero(self):
        for p in self.model.parameters():
            p.grad = None
            if hasattr(p, "grad_sample"):
                p.grad_sample = None

    def step(self):
        self.zero()
        self.fwd_bwd()

    def fwd_bwd(self):
        F.cross_entropy(self.model(self.x), self.y).backward()
        if self.tracker is not None:
            self.tracker.collect().mean_norm()
        elif self.name == "opacus":
            torch.stack([p.grad_sample.flatten(1).norm(dim=1).mean() for p in self.model.parameters()
                         if getattr(p, "grad_sample", None) is not None])

    def time_once(self):
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def peak_bytes(self):
        self.zero()  # the previous step's gradients are freed before measuring
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.fwd_bwd()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.fwd_bwd()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        cur = peak = 0
        for _, b in events:
            cur += b
            peak = max(peak, cur)
        return peak


def bench(title, model, x, y, names, rounds, device):
    modes = []
    print(f"\n{title}", flush=True)
    for n in names:
        try:
            m = Mode(n, model, x, y, device)
            m.step()  # warm-up (also first-call allocations)
            m.step()
            modes.append(m)
        except Exception as e:  # noqa: BLE001 -- reported, e.g. Opacus refusing a layer
            msg = " ".join(str(e).split())[:200]
            print(f"  {n}: cannot run: {type(e).__name__}: {msg}")
    times = {m.name: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            times[m.name].append(m.time_once())
    mem = {m.name: m.peak_bytes() for m in modes}
    base_t, base_m = statistics.median(times["plain"]), mem["plain"]
    print(f"  {'mode':<16} {'median s':>9} {'min s':>8} {'max s':>8} {'time x':>7} {'peak MiB':>9} {'mem x':>6}")
    for m in modes:
        ts = times[m.name]
        med = statistics.median(ts)
        print(f"  {m.name:<16} {med:9.3f} {min(ts):8.3f} {max(ts):8.3f} {med / base_t:7.2f} "
              f"{mem[m.name] / 2**20:9.1f} {mem[m.name] / base_m:6.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-opacus", action="store_true")
    ap.add_argument("--models", default="resnet18,mlp", help="comma-separated subset of resnet18,mlp")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.batch < 2:
        raise SystemExit("--rounds must be >= 1 and --batch >= 2")
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    try:
        import opacus

        have_opacus = not args.skip_opacus
        opacus_note = f"opacus {opacus.__version__}"
    except ImportError:
        have_opacus, opacus_note = False, "opacus not installed"
    print(f"torch {torch.__version__}, {opacus_note}, device {device}, threads {torch.get_num_threads()}, "
          f"{platform.machine()}, batch {args.batch}, rounds {args.rounds}")
    models = set(args.models.split(","))
    if not models or models - {"resnet18", "mlp"}:
        raise SystemExit(f"--models: expected a comma-separated subset of resnet18,mlp, got {args.models!r}")
    base = ["plain", "persample", "persample-clars"]
    op = ["opacus"] if have_opacus else []
    if "resnet18" in models:
        bench("CIFAR ResNet-18 (BatchNorm)", cifar_resnet18(), x, y, base + op, args.rounds, device)
        if have_opacus:
            bench("CIFAR ResNet-18, GroupNorm variant (for Opacus)", cifar_resnet18(group_norm), x, y,
                  base + op, args.rounds, device)
    if "mlp" in models:
        bench("MLP 3072-1024-512-10 with BatchNorm", mlp_bn(), x, y, base + op, args.rounds, device)
        if have_opacus:
            bench("MLP, GroupNorm variant (for Opacus)", mlp_bn(group_norm), x, y, base + op, args.rounds, device)


if __name__ == "__main__":
    main()
