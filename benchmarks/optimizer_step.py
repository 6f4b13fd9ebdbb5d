"""Time of one ``optimizer.step()`` (gradients preset), largebatch vs torch.optim vs peers.

Parameter sets: torchvision ResNet-50 (25.6M parameters, 161 tensors) and a CIFAR ResNet-18
(torchvision resnet18 with a 3x3 stride-1 stem, no max-pool, 10 classes: 11.2M, 62 tensors).
Gradients are drawn once from a fixed seed (``N(0, 1e-2^2)``) and stay set; every optimizer
steps the same parameters (they drift slowly, which changes no timing).

Implementations: every largebatch optimizer (LARS, TVLARS, LAMB, LALC) on each execution
path (``per_tensor``, ``foreach``, ``compiled``, ``native``: the CPU default, whose library is
built at its first step when not cached, in the "first step" column; groups from ``param_groups``: weight decay
and trust ratio on tensors with ``ndim > 1``), ``torch.optim.SGD`` (momentum 0.9) and
``torch.optim.Adam``, each with ``foreach=True`` and ``fused=True``, and the peers
``timm.optim.Lars``, ``timm.optim.Lamb``, ``pytorch_optimizer.LARS``,
``pytorch_optimizer.Lamb`` at their defaults (skipped with a note if not installed:
``pip install -e '.[bench]'``). CLARS is not timed: its step needs per-sample norms from a
real backward pass; its update is TVLARS's with another norm in the trust ratio (the same
native kernel).

Time: each implementation is warmed up (3 steps; the ``compiled`` path compiles on its first
step, reported separately as "first step"), then timed for ``--rounds`` rounds; every round
steps every implementation once, in an order rotated by one each round, so that machine
drift hits all alike. Reported: median and min-max in ms, and the ratio of the median to
the median of ``SGD(fused=True)`` (SGD-type rules: LARS, TVLARS, LALC) or
``Adam(fused=True)`` (Adam-type: LAMB) of the same run.

Kernel variants (``largebatch/optim/_compiled.py``, docs/performance.md "Kernel variants"):
the ``compiled`` rows use the default variant (``f64``) or the one forced by
``LARGEBATCH_KERNEL_VARIANT``. ``--variants`` adds one row per variant this CPU offers for each
class, forced (``compiled[f32]``...), so that one run reports all of them side by side. The header names the CPU model (``/proc/cpuinfo``),
its ISA level (``torch.backends.cpu.get_cpu_capability()``) and the thread count.

Memory: peak extra memory of one step, i.e. the peak of bytes allocated through PyTorch's
allocator during a step (after warm-up, so optimizer state already exists) minus what was
allocated when it started: on CPU from the allocation events of ``torch.profiler``
(``profile_memory=True``; every allocation of PyTorch's CPU allocator, including inductor's
buffers; memory taken outside it, e.g. by OpenMP runtimes, is not seen), on CUDA from
``torch.cuda.max_memory_allocated``. The target is at most the largest parameter tensor.

    python benchmarks/optimizer_step.py [--quick] [--rounds N] [--sets resnet50,cifar-resnet18]
                                        [--device cpu|cuda] [--threads N] [--variants]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from largebatch.optim import LALC, LAMB, LARS, TVLARS, _compiled, param_groups

WD = 5e-5
SGD_TARGET, ADAM_TARGET = 2.0, 2.0


def cifar_resnet18() -> nn.Module:
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


PARAM_SETS: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "cifar-resnet18": cifar_resnet18,
}


class Forced:
    """An optimizer whose every step runs with one kernel variant forced (``--variants``)."""

    def __init__(self, opt, variant: str):
        self.opt, self.variant = opt, variant

    def step(self):
        with _compiled.kernel_variant(self.variant):
            return self.opt.step()


def implementations(model: nn.Module, paths: list[str], variants: list[str] = ()
                    ) -> list[tuple[str, str, Callable[[], torch.optim.Optimizer]]]:
    """``(name, kind, factory)``; kind "sgd" or "adam" picks the fused baseline. ``variants``:
    kernel variants timed forced, as rows ``largebatch NAME compiled[VARIANT]``."""
    ps = list(model.parameters())
    out = [
        ("torch SGD foreach", "sgd", lambda: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, foreach=True)),
        ("torch SGD fused", "sgd", lambda: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, fused=True)),
        ("torch Adam foreach", "adam", lambda: torch.optim.Adam(ps, lr=1e-3, weight_decay=WD, foreach=True)),
        ("torch Adam fused", "adam", lambda: torch.optim.Adam(ps, lr=1e-3, weight_decay=WD, fused=True)),
    ]
    ours = [("LARS", "sgd", LARS, dict(lr=0.1, momentum=0.9)), ("TVLARS", "sgd", TVLARS, dict(lr=1.0)),
            ("LALC", "sgd", LALC, dict(lr=0.1, momentum=0.9)), ("LAMB", "adam", LAMB, dict(lr=1e-3))]
    for name, kind, cls, kw in ours:
        for path in paths:
            out.append((f"largebatch {name} {path}", kind,
                        lambda cls=cls, kw=kw, path=path: cls(param_groups(model, weight_decay=WD), path=path, **kw)))
        for v in variants:
            out.append((f"largebatch {name} compiled[{v}]", kind, lambda cls=cls, kw=kw, v=v: Forced(
                cls(param_groups(model, weight_decay=WD), path="compiled", **kw), v)))
    try:
        import timm.optim as to
        out += [("timm Lars", "sgd", lambda: to.Lars(ps, lr=0.1, momentum=0.9, weight_decay=WD)),
                ("timm Lamb", "adam", lambda: to.Lamb(ps, lr=1e-3, weight_decay=WD))]
    except ImportError:
        print("note: timm not installed; its Lars/Lamb are skipped (pip install -e '.[bench]')")
    try:
        import pytorch_optimizer as po
        out += [("pytorch_optimizer LARS", "sgd", lambda: po.LARS(ps, lr=0.1, momentum=0.9, weight_decay=WD)),
                ("pytorch_optimizer Lamb", "adam", lambda: po.Lamb(ps, lr=1e-3, weight_decay=WD))]
    except ImportError:
        print("note: pytorch_optimizer not installed; its LARS/Lamb are skipped (pip install -e '.[bench]')")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(opt, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []

    def walk(ev):
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            allocs.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    cur = peak = 0
    for _, size in sorted(allocs):
        cur += size
        peak = max(peak, cur)
    return peak


def bench_set(set_name: str, rounds: int, device: torch.device, paths: list[str], warmup: int = 3,
              variants: list[str] = ()):
    torch.manual_seed(0)
    model = PARAM_SETS[set_name]().to(device)
    gen = torch.Generator().manual_seed(1234)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    impls = implementations(model, paths, variants)
    opts, first = {}, {}
    for name, _, make in impls:
        opts[name] = make()
        first[name] = timed_step(opts[name], device)
        for _ in range(warmup - 1):
            timed_step(opts[name], device)
    names = [n for n, _, _ in impls]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed_step(opts[n], device))
    mem = {n: peak_extra_bytes(opts[n].step, device) for n in names}
    med = {n: statistics.median(v) for n, v in times.items()}
    base = {"sgd": med.get("torch SGD fused"), "adam": med.get("torch Adam fused")}
    rows = []
    for name, kind, _ in impls:
        ratio = med[name] / base[kind] if base[kind] else float("nan")
        rows.append(dict(name=name, kind=kind, median=med[name] * 1e3, lo=min(times[name]) * 1e3,
                         hi=max(times[name]) * 1e3, ratio=ratio, first=first[name] * 1e3,
                         mem=mem[name]))
    del opts
    return dict(set=set_name, n_params=n_params, n_tensors=len(list(model.parameters())),
                largest=largest, rows=rows)


def cpu_description() -> str:
    """CPU model, ISA level, thread count (and the machine's CPU count)."""
    return (f"CPU {_compiled.cpu_model()}, ISA {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads ({os.cpu_count()} CPUs)")


def markdown(res) -> str:
    mib = 2 ** 20
    lines = [f"### {res['set']}: {res['n_params'] / 1e6:.1f}M parameters in {res['n_tensors']} tensors "
             f"(largest tensor {res['largest'] / mib:.1f} MiB)", "",
             "| step of | median ms | min-max ms | x fused baseline | first step ms | peak extra MiB (x largest tensor) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        base = "SGD" if r["kind"] == "sgd" else "Adam"
        target = SGD_TARGET if r["kind"] == "sgd" else ADAM_TARGET
        mark = " **(target met)**" if r["name"].startswith("largebatch") and r["ratio"] <= target else ""
        lines.append(f"| {r['name']} | {r['median']:.2f} | {r['lo']:.2f}-{r['hi']:.2f} | "
                     f"{r['ratio']:.2f}x {base}{mark} | {r['first']:.0f} | "
                     f"{r['mem'] / mib:.2f} ({r['mem'] / res['largest']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds, CIFAR ResNet-18 only")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; 5 with --quick)")
    ap.add_argument("--sets", default=None, help=f"comma-separated subset of {','.join(PARAM_SETS)}")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--paths", default="per_tensor,foreach,compiled,native", help="largebatch paths to time")
    ap.add_argument("--variants", action="store_true",
                    help="also time every kernel variant this CPU offers, forced (rows compiled[VARIANT])")
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    if rounds < 1:
        raise ValueError(f"invalid rounds={rounds}: expected an integer >= 1")
    sets = (args.sets or ("cifar-resnet18" if args.quick else ",".join(PARAM_SETS))).split(",")
    for s in sets:
        if s not in PARAM_SETS:
            raise ValueError(f"invalid sets entry {s!r}: expected some of {sorted(PARAM_SETS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.paths.split(",")
    variants = list(_compiled.supported_variants()) if args.variants and device.type == "cpu" else []
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# optimizer step benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}), "
          f"{cpu_description()}, torch {torch.__version__}, "
          f"{rounds} rounds, load average at start {load and ' '.join(f'{x:.2f}' for x in load)}")
    if device.type == "cpu":
        forced = _compiled.forced_variant()
        print(f"kernel variants offered: {', '.join(_compiled.supported_variants())}; "
              + f"compiled rows: {forced or _compiled.DEFAULT_VARIANT}" + (" (forced)" if forced else ""))
    for s in sets:
        t0 = time.time()
        res = bench_set(s, rounds, device, paths, variants=variants)
        print()
        print(markdown(res))
        print(f"\n({time.time() - t0:.0f} s for this set; first step includes compilation for the compiled path)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nload average at end {load and ' '.join(f'{x:.2f}' for x in load)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
