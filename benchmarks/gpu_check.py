"""The checks that need a GPU, in one command (``make gpu-check``), under 8 minutes on one GPU.

Stages (each with its own time limit; the limits add up to 7.5 minutes):

1. ``cuda-tests``: the test suite's CUDA-only tests (``pytest -k cuda``: every test that skips
   without CUDA has ``cuda`` in its name, which ``tests/test_gpu_check.py`` holds): CUDA-graph
   capture of ``step()``, no host sync in the default path and in ``GradScaler`` steps.
2. ``step-benchmark``: ``benchmarks/optimizer_step.py`` on CUDA (ResNet-50's parameters, the
   foreach path: the CUDA default), against ``SGD(fused=True)`` / ``Adam(fused=True)``.
3. ``cuda-graph``: each optimizer's ``step()`` captured in a CUDA graph and replayed, against
   eager steps (lr a device tensor; CLARS's step reads per-sample statistics measured outside
   the graph, so it is not captured).
4. ``no-sync``: ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` for all
   five optimizers under ``torch.cuda.set_sync_debug_mode("error")``.
5. ``amp-training``: ``largebatch train`` on digits with ``--precision fp16`` (autocast +
   GradScaler) for each optimizer, 3 epochs: it must finish with a lower training loss than
   its first epoch's.

Writes one Markdown report (``--out``, default ``gpu-check-report.md``): the device, a table of
stages (status, seconds) and each stage's output. Exit status 0 when every stage passed.
Without a CUDA device it prints one line and exits with status 2; ``--dry-run`` instead runs
every stage's CPU-checkable part (the tests are collected, not run; the benchmark's arguments
are parsed; the in-process stages are listed), so the command's structure is tested on CPU.

    python benchmarks/gpu_check.py [--out gpu-check-report.md] [--dry-run] [--tests PATH...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("LARS", "LAMB", "TVLARS", "LALC", "CLARS")
BENCH_ARGS = ["--device", "cuda", "--rounds", "7", "--sets", "resnet50", "--paths", "foreach"]
TESTS = ["tests"]  # --tests


@dataclass
class Stage:
    name: str
    what: str
    limit_s: int
    run: Callable[[bool, int], tuple[bool, str]]  # (dry_run, limit_s) -> (passed, output)
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""
    extra: dict = field(default_factory=dict)


def _subprocess(cmd: list[str], limit_s: int) -> tuple[bool, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return False, f"$ {' '.join(cmd)}\n{out[-4000:]}\nTIMEOUT after {limit_s} s"
    return p.returncode == 0, f"$ {' '.join(cmd)}\n(exit {p.returncode})\n{(p.stdout + p.stderr)[-8000:]}"


# ------------------------------------------------------------------------------- stages
def cuda_tests(dry: bool, limit_s: int) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *TESTS]
    if dry:  # collected, not run: "N/M tests collected (K deselected)"
        ok, out = _subprocess(cmd + ["--collect-only"], limit_s)
        m = re.search(r"(\d+)/\d+ tests collected", out)
        return ok and m is not None and int(m.group(1)) > 0, out
    return _subprocess(cmd + ["-rA"], limit_s)


def step_benchmark(dry: bool, limit_s: int) -> tuple[bool, str]:
    script = os.path.join(ROOT, "benchmarks", "optimizer_step.py")
    if dry:  # the arguments parse (argparse exits 0 on --help only after checking nothing else)
        ok, out = _subprocess([sys.executable, script, "--help"], limit_s)
        return ok and all(a in out for a in BENCH_ARGS if a.startswith("--")), out
    return _subprocess([sys.executable, script, *BENCH_ARGS], limit_s)


def _model(device):
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10)).to(device)


def _optimizer(name, model, lr, **kw):
    import largebatch.optim as lbo

    extra = {"model": model} if name == "CLARS" else {}
    return getattr(lbo, name)(lbo.param_groups(model, weight_decay=1e-3), lr=lr, **extra, **kw)


def cuda_graph(dry: bool, limit_s: int) -> tuple[bool, str]:
    names = [n for n in NAMES if n != "CLARS"]
    if dry:
        return True, f"would capture step() of {', '.join(names)} and replay it 4 times against eager steps"
    lines, ok = [], True
    for name in names:
        try:
            a, b = _model("cuda"), _model("cuda")
            opt_a = _optimizer(name, a, 0.05)
            opt_b = _optimizer(name, b, torch.tensor(0.05, device="cuda"))
            grads = [[torch.randn_like(p) for p in a.parameters()] for _ in range(5)]
            for p, g in zip(b.parameters(), grads[0]):
                p.grad = g.clone()  # static gradient buffers of the graph
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                opt_b.step()  # warm-up: state created outside the graph
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt_b.step()
            for p, g in zip(a.parameters(), grads[0]):
                p.grad = g.clone()
            opt_a.step()
            for gs in grads[1:]:
                for p, q, g in zip(a.parameters(), b.parameters(), gs):
                    p.grad = g.clone()
                    q.grad.copy_(g)
                opt_a.step()
                graph.replay()
            diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
            good = diff <= 1e-5
            ok &= good
            lines.append(f"{name}: captured, 4 replays, max |graph - eager| = {diff:.3g} ({'ok' if good else 'FAIL'})")
        except Exception:
            ok = False
            lines.append(f"{name}: FAIL\n{traceback.format_exc(limit=3)}")
    return ok, "\n".join(lines)


def no_sync(dry: bool, limit_s: int) -> tuple[bool, str]:
    if dry:
        return True, f"would run 3 GradScaler steps of {', '.join(NAMES)} under set_sync_debug_mode('error')"
    import torch.nn.functional as F

    lines, ok = [], True
    for name in NAMES:
        try:
            model = _model("cuda")
            kw = {"unscale_persample": True} if name == "CLARS" else {}
            opt = _optimizer(name, model, torch.tensor(0.05, device="cuda"), **kw)
            scaler = torch.amp.GradScaler("cuda")
            for t in range(4):
                x = torch.randn(32, 64, device="cuda")
                y = torch.randint(0, 10, (32,), device="cuda")
                opt.zero_grad()
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = F.cross_entropy(model(x), y)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error" if t else 0)  # step 0 creates state, compiles
                try:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            ok &= finite
            lines.append(f"{name}: 3 scaled steps without a host sync, weights finite: {finite}")
        except Exception:
            ok = False
            lines.append(f"{name}: FAIL\n{traceback.format_exc(limit=3)}")
    return ok, "\n".join(lines)


def amp_training(dry: bool, limit_s: int) -> tuple[bool, str]:
    from largebatch.optim import OPTIMIZERS
    from largebatch.train.config import TrainConfig

    names = [n.lower() for n in NAMES]
    out_root = tempfile.mkdtemp(prefix="gpu-check-amp-")

    def cfg(name):  # the demo recipe's peak lr (largebatch demo), warm-up + cosine
        recipe = OPTIMIZERS[name].demo[0]
        return TrainConfig(dataset="digits", model="mlp", mlp_depth=2, mlp_width=128, mlp_batchnorm=True,
                           batch_size=512, epochs=3, optimizer=name, lr=recipe["lr"], lr_scaling="none",
                           weight_decay=recipe.get("weight_decay", 0.0), precision="fp16", device="cuda",
                           out_dir=os.path.join(out_root, name), progress=False)

    if dry:
        for name in names:  # the configurations are valid apart from the device
            cfg(name).validate()
        return True, f"would train {', '.join(names)} on digits, fp16 + GradScaler, 3 epochs each"
    from largebatch.train.loop import train

    lines, ok = [], True
    t_end = time.time() + limit_s
    for name in names:
        if time.time() > t_end:
            ok = False
            lines.append(f"{name}: not run (stage time limit)")
            continue
        try:
            res = train(cfg(name), log=lambda s: None)
            last = res.history[-1] if res.history else {}
            first = res.history[0]["train_loss"] if res.history else float("nan")
            good = res.status == "finished" and last.get("train_loss", float("nan")) < first  # it learns
            ok &= good
            lines.append(f"{name}: {res.status}, first epoch's train_loss {first:.4g}, last epoch's " + ", ".join(
                f"{k} {last[k]:.4g}" for k in ("train_loss", "test_acc", "test_loss") if k in last))
        except Exception:
            ok = False
            lines.append(f"{name}: FAIL\n{traceback.format_exc(limit=3)}")
    return ok, "\n".join(lines)


STAGES = [
    Stage("cuda-tests", "the CUDA-only tests (pytest -k cuda)", 180, cuda_tests),
    Stage("step-benchmark", "optimizer_step.py on CUDA vs SGD/Adam(fused=True)", 150, step_benchmark),
    Stage("cuda-graph", "step() captured in a CUDA graph, replayed vs eager", 30, cuda_graph),
    Stage("no-sync", "GradScaler steps under set_sync_debug_mode('error')", 30, no_sync),
    Stage("amp-training", "largebatch train, digits, fp16 + GradScaler, 3 epochs per optimizer", 60, amp_training),
]
TOTAL_LIMIT_S = 480


def report(stages: list[Stage], device: str, dry: bool, started: str) -> str:
    rows = ["| stage | what | status | seconds (limit) |", "|---|---|---|---:|"]
    rows += [f"| `{s.name}` | {s.what} | {s.status} | {s.seconds:.1f} ({s.limit_s}) |" for s in stages]
    body = [f"# GPU check{' (dry run)' if dry else ''}", "",
            f"{started} UTC; device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"python {platform.python_version()}; command: `python benchmarks/gpu_check.py"
            f"{' --dry-run' if dry else ''}`", "", *rows, ""]
    for s in stages:
        body += [f"## {s.name}", "", "```", s.output.rstrip(), "```", ""]
    summary = {"dry_run": dry, "device": device, "stages": {s.name: s.status for s in stages}}
    body += ["```json", json.dumps(summary, indent=1), "```", ""]
    return "\n".join(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-check-report.md", help="the report file (Markdown)")
    ap.add_argument("--dry-run", action="store_true", help="on CPU: check the stages' structure, run nothing on a GPU")
    ap.add_argument("--tests", nargs="+", default=TESTS, help="where the cuda-tests stage looks (default: tests)")
    args = ap.parse_args(argv)
    TESTS[:] = args.tests
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device available (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --dry-run to check its structure on CPU", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(ROOT, "src"))
    device = "dry run on CPU" if args.dry_run else f"{torch.cuda.get_device_name(0)}"
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    t_all = time.time()
    for s in STAGES:
        t0 = time.time()
        print(f"gpu_check: {s.name} ...", flush=True)
        try:
            ok, s.output = s.run(args.dry_run, s.limit_s)
        except Exception:
            ok, s.output = False, traceback.format_exc()
        s.seconds = time.time() - t0
        s.status = ("ok" if ok else "FAIL") + (" (dry run)" if args.dry_run else "")
        print(f"gpu_check: {s.name}: {s.status} in {s.seconds:.1f} s", flush=True)
    with open(args.out, "w") as f:
        f.write(report(STAGES, device, args.dry_run, started))
    failed = [s.name for s in STAGES if not s.status.startswith("ok")]
    print(f"gpu_check: {len(STAGES) - len(failed)}/{len(STAGES)} stages ok in {time.time() - t_all:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
