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
warm-up; "paired x" is the median over rounds of the ratio to ``plain`` in the same round
(steadier when other processes share the CPU). ``--clock cpu`` measures CPU seconds of
this process instead of wall time (on a busy machine, with ``--threads 1``, or with
``OMP_WAIT_POLICY=PASSIVE`` so that waiting OpenMP threads do not spin). Memory: peak of
live bytes allocated through PyTorch's allocator during one forward+backward, relative to
the start (model, inputs and the previous step's tensors excluded), from ``torch.profiler``
memory events on CPU or ``torch.cuda.max_memory_allocated`` on CUDA. Memory that bypasses
PyTorch's allocator (oneDNN scratch space, if any) is not counted.

``--reference`` adds ``persample-clars[grouped]``: CLARS's tensors with every convolution
forced onto the reference route of ``largebatch.persample.rules.conv_weight_sqnorms`` (one
grouped ``convolution_backward`` per chunk) instead of the route its cost model picks.

``--compare-rules PATH`` adds ``persample[compare]`` and ``persample-clars[compare]``: the
same trackers with every rule replaced by the function of the same name in the file
``PATH`` (another version of ``largebatch/persample/rules.py``), for before/after ratios
measured side by side in one run.

``--layers`` instead times, per distinct convolution of CIFAR ResNet-18 (32x32, 16x16, 8x8
and 4x4 stages), each exact route of ``conv_weight_sqnorms`` side by side with the plain
batch weight gradient (what ``backward`` computes anyway), interleaved, min over rounds,
and prints the cost model's estimates and choices, the old rule's included (grouped or
the Gram identity over ``F.unfold`` patches, in 64 MiB chunks; the latter kept here only).

    python benchmarks/persample_overhead.py [--rounds 5] [--batch 128] [--device cpu|cuda]
    python benchmarks/persample_overhead.py --quick          # ResNet-18 (BN) only, 3 rounds, no Opacus
    git show HEAD:src/largebatch/persample/rules.py > /tmp/rules_before.py
    python benchmarks/persample_overhead.py --quick --compare-rules /tmp/rules_before.py
    python benchmarks/persample_overhead.py --layers [--rounds 5] [--threads 1 --clock cpu]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from largebatch.persample import PerSampleGradNorms
from largebatch.persample import rules


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


def _forced_conv_rule(route):
    def rule(m, x, d, n, want, budget):
        out = rules.conv_rule(m, x, d, n, want - {"weight"}, budget)
        if "weight" in want:
            out["weight"] = rules.conv_weight_sqnorms(m, x[:n], d[:n], budget, route=route)
        return out

    return rule


def cpu_model() -> str:
    from largebatch.optim._compiled import cpu_model as model  # one reader of /proc/cpuinfo

    return model()


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all threads)
COMPARE_RULES = None  # --compare-rules: another version of largebatch/persample/rules.py, as a module


def _load_rules(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_rules", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


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
        base, _, variant = name.partition("[")
        if base == "persample":
            self.tracker = PerSampleGradNorms(self.model)
        elif base == "persample-clars":
            self.tracker = PerSampleGradNorms(self.model, params=[p for p in self.model.parameters() if p.ndim > 1])
        if variant == "grouped]":  # every convolution on the reference route
            for e in self.tracker._entries:
                if isinstance(e.module, nn.modules.conv._ConvNd):
                    e.rule = _forced_conv_rule("grouped")
        elif variant == "compare]":  # --compare-rules: every rule from the other file
            for e in self.tracker._entries:
                e.rule = getattr(COMPARE_RULES, e.rule.__name__)
        if name == "opacus":
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
        t0 = CLOCK()
        self.step()
        sync(self.device)
        return CLOCK() - t0

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
    print(f"  {'mode':<26} {'median s':>9} {'min s':>8} {'max s':>8} {'time x':>7} {'paired x':>9} "
          f"{'peak MiB':>9} {'mem x':>6}")
    for m in modes:
        ts = times[m.name]
        med = statistics.median(ts)
        # median over rounds of (this mode / plain in the same round): steadier on a busy machine
        paired = statistics.median(t / b for t, b in zip(ts, times["plain"]))
        print(f"  {m.name:<26} {med:9.3f} {min(ts):8.3f} {max(ts):8.3f} {med / base_t:7.2f} {paired:9.2f} "
              f"{mem[m.name] / 2**20:9.1f} {mem[m.name] / base_m:6.2f}")


def _unfold_gram(m, x, d, budget):
    """The Gram identity over F.unfold patches (the rule's small-map route before; 2-D only)."""
    xp, padding = rules._explicit_padding(m, x)
    g, cin, cout, kk = m.groups, m.in_channels, m.out_channels, math.prod(m.kernel_size)
    L = math.prod(d.shape[2:])
    res = []
    for s, e in rules._chunks(x.shape[0], x.element_size() * (cin * kk * L + 2 * g * L * L), budget):
        c = e - s
        u = F.unfold(xp[s:e], m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        u = u.reshape(c, g, (cin // g) * kk, L)
        dg = d[s:e].reshape(c, g, cout // g, L)
        uu, dd = u.transpose(2, 3) @ u, dg.transpose(2, 3) @ dg
        res.append(torch.linalg.vecdot(uu.reshape(c, -1), dd.reshape(c, -1)))
    return torch.cat(res)


class _cpu_chunks:
    """Temporarily set the rules' CPU chunk target (bytes per thread)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        self.old, rules._CPU_CHUNK_BYTES = rules._CPU_CHUNK_BYTES, self.nbytes

    def __exit__(self, *exc):
        rules._CPU_CHUNK_BYTES = self.old


def conv_layers(batch, rounds, device, budget=64 * 2**20):
    """Per-layer micro-benchmark of the convolution routes at CIFAR ResNet-18's shapes."""
    model = cifar_resnet18().to(device)
    shapes = {}

    def rec(mod, inp, out):
        key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, tuple(inp[0].shape[2:]))
        shapes.setdefault(key, [mod, tuple(out.shape[2:]), 0])[2] += 1

    hs = [mod.register_forward_hook(rec) for mod in model.modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(2, 3, 32, 32, device=device))
    for h in hs:
        h.remove()
    print(f"\nPer-layer weight-gradient norms of CIFAR ResNet-18's convolutions, batch {batch}, float32: "
          f"min over {rounds} interleaved rounds, ms (x = / plain); plain = the batch weight gradient "
          f"backward computes anyway; '64M' = chunks of max_chunk_bytes (64 MiB), as before; others "
          f"with the CPU chunk target ({rules._CPU_CHUNK_BYTES >> 20} MiB per thread). Cost model: M "
          f"multiply-add equivalents per sample (_MEM_WEIGHT={rules._MEM_WEIGHT})")
    cols = ["plain", "grouped 64M", "unfold-gram 64M", "grouped", "gram", "matmul"]
    print(f"  {'Cin-Cout k/stride, in->out x count':<31}" + "".join(f" {c:>17}" for c in cols)
          + f" {'materialize':>11} {'gram':>6} {'old':>11} {'new':>7}")
    tot = {"plain": 0.0, "new": 0.0, "old": 0.0}
    torch.manual_seed(0)
    big = _cpu_chunks(2**62)
    for (cin, cout, k, st, pad, hw), (mod, ohw, count) in shapes.items():
        x = torch.randn(batch, cin, *hw, device=device)
        d = torch.randn(batch, cout, *ohw, device=device)
        w = d.new_empty(1).expand(mod.weight.shape)
        sq = rules.conv_weight_sqnorms

        def old_chunks(f):
            def g():
                with big:
                    return f()
            return g

        fns = {"plain": lambda: torch.ops.aten.convolution_backward(
            d, x, w, None, list(mod.stride), list(mod.padding), list(mod.dilation), False, [0, 0], mod.groups,
            [False, True, False])[1],
            "grouped 64M": old_chunks(lambda: sq(mod, x, d, budget, route="grouped")),
            "unfold-gram 64M": lambda: _unfold_gram(mod, x, d, budget)}
        for r in ("grouped", "gram", "matmul"):
            fns[r] = lambda r=r: sq(mod, x, d, budget, route=r)
        ref = fns["grouped"]()
        for c in cols[2:]:  # all exact: the same values up to float32 rounding
            torch.testing.assert_close(fns[c](), ref, rtol=1e-3, atol=0)
        times = {c: [] for c in cols}
        for _ in range(rounds):
            for c in cols:
                sync(device)
                t0 = CLOCK()
                fns[c]()
                sync(device)
                times[c].append(1e3 * (CLOCK() - t0))
        best = {c: min(v) for c, v in times.items()}
        plan, _, _ = rules.conv_plan(mod, x, d)
        costs, new = plan.costs(), plan.route()
        L, kk = math.prod(ohw), math.prod(mod.kernel_size)
        old = "unfold-gram 64M" if L * L * (cin * kk + cout) < cout * cin * kk * L else "grouped 64M"
        name = f"{cin}-{cout} {k[0]}x{k[0]}/{st[0]}, {hw[0]}->{ohw[0]} x{count}"
        line = f"  {name:<31} {best['plain']:17.1f}"
        for c in cols[1:]:
            line += f" {best[c]:10.1f} ({best[c] / best['plain']:4.1f})"
        print(line + f" {costs['materialize'] / 1e6:11.1f} {costs['gram'] / 1e6:6.1f} {old.split()[0]:>11} "
              f"{new:>7}", flush=True)
        tot["plain"] += count * best["plain"]
        tot["new"] += count * best[new]
        tot["old"] += count * best[old]
    print(f"  whole network (min times x count): plain weight gradients {tot['plain']:.0f} ms; per-sample "
          f"norms: old rule {tot['old']:.0f} ms ({tot['old'] / tot['plain']:.2f}x), new rule "
          f"{tot['new']:.0f} ms ({tot['new'] / tot['plain']:.2f}x)")


def main(argv=None):
    global CLOCK, COMPARE_RULES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="default 5 (3 with --quick)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-opacus", action="store_true")
    ap.add_argument("--models", default="resnet18,mlp", help="comma-separated subset of resnet18,mlp")
    ap.add_argument("--quick", action="store_true", help="ResNet-18 (BatchNorm) only, 3 rounds, no Opacus")
    ap.add_argument("--reference", action="store_true",
                    help="also run persample-clars[grouped]: convolutions on the reference route")
    ap.add_argument("--layers", action="store_true", help="per-layer micro-benchmark of the convolution routes")
    ap.add_argument("--compare-rules", metavar="PATH",
                    help="also run persample[compare] and persample-clars[compare]: the rules of another "
                         "rules.py (e.g. an older version, from `git show REV:src/largebatch/persample/rules.py`)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time of this process instead of wall time (steadier on a busy machine, "
                         "best with --threads 1; counts OpenMP spin-waiting with more threads)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.skip_opacus = "resnet18", True
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.rounds < 1 or args.batch < 2:
        raise SystemExit("--rounds must be >= 1 and --batch >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
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
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"torch {torch.__version__}, {opacus_note}, device {device} ({dev_name}), threads {torch.get_num_threads()}, "
          f"{platform.machine()}, {os.cpu_count()} logical CPUs, load average {_load()}, batch {args.batch}, "
          f"rounds {args.rounds}, {args.clock} clock")
    if args.layers:
        conv_layers(args.batch, args.rounds, device)
        return
    models = set(args.models.split(","))
    if not models or models - {"resnet18", "mlp"}:
        raise SystemExit(f"--models: expected a comma-separated subset of resnet18,mlp, got {args.models!r}")
    base = ["plain", "persample", "persample-clars"] + (["persample-clars[grouped]"] if args.reference else [])
    if args.compare_rules:
        COMPARE_RULES = _load_rules(args.compare_rules)
        base += ["persample[compare]", "persample-clars[compare]"]
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
