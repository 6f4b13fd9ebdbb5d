"""Training throughput (images/s): the `largebatch train` harness vs a bare hand-written loop,
and Barlow Twins pre-training (`largebatch pretrain`) on the same backbone.

Both train the same model with the same optimizer (LARS, warm-up + cosine via LambdaLR) on the
same random uint8 data held on the device, one optimizer step per batch, no augmentation.
The bare loop is the minimum a user would write (index, normalize, forward, backward, step,
schedule); the harness adds what `largebatch train` always does (per-step loss kept on the
device, diagnostics every ``--stats-every`` steps, non-finite checks, metrics reduction).

Images/s is measured over the training steps of each epoch (evaluation and the end-of-epoch
checkpoint/metrics writing excluded for both; the harness reports them separately) and the
median over epochs 2..E is taken (epoch 1 is warm-up), then the best of ``--repeats``
runs (other processes on a shared machine only ever slow a run down), which alternate bare-first and harness-first after one untimed warm-up run (it compiles
the optimizer's CPU kernels) so that drift in machine load affects both.

Pre-training counts images (each makes two views, each view a forward and backward through
the backbone and the projector ``--projector``), with the kNN monitor off.

    python benchmarks/train_throughput.py            # both models, CPU
    python benchmarks/train_throughput.py --models mlp --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from largebatch import optim as lb
from largebatch.schedules import warmup_cosine
from largebatch.train.config import TrainConfig
from largebatch.train.data import ArrayDataset, normalize
from largebatch.train.factory import steps_per_epoch
from largebatch.train.loop import train
from largebatch.models import build_model

SETUPS = {
    # name: (model, image shape, classes, train images, global batch, epochs, lr)
    "mlp": ("mlp", (1, 28, 28), 10, 16384, 4096, 5, 4.0),  # the demo model at the demo's Fashion-MNIST shape
    "resnet18": ("resnet18", (3, 32, 32), 10, 256, 64, 3, 4.0),  # CIFAR stem
}


def random_dataset(shape, classes, n_train, n_test=256, seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    lab = lambda n: torch.randint(0, classes, (n,), generator=g)
    return ArrayDataset("random", mk(n_train), lab(n_train), mk(n_test), lab(n_test), classes)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model_name, ds, batch, epochs, lr, device) -> list[float]:
    """Images/s per epoch of the hand-written loop."""
    torch.manual_seed(0)
    model = build_model(model_name, ds.num_classes, ds.shape).to(device)
    opt = lb.LARS(lb.param_groups(model, weight_decay=5e-4), lr=lr, momentum=0.9)
    spe = ds.train_x.shape[0] // batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(epochs * spe, spe))
    ds = ds.to(device)
    out = []
    for epoch in range(epochs):
        perm = torch.randperm(ds.train_x.shape[0], device=device)
        _sync(device)
        t0 = time.perf_counter()
        for s in range(spe):
            idx = perm[s * batch:(s + 1) * batch]
            x = normalize(ds.train_x[idx], ds.mean, ds.std)
            loss = F.cross_entropy(model(x), ds.train_y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        _sync(device)
        out.append(spe * batch / (time.perf_counter() - t0))
    return out


def harness(model_name, ds, batch, epochs, lr, device, stats_every) -> tuple[list[float], float]:
    """Images/s per epoch as the harness measures it, and its whole wall time."""
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(model=model_name, optimizer="lars", lr=lr, batch_size=batch, epochs=epochs,
                          schedule="cosine", warmup_epochs=1, augment=False, stats_every=stats_every,
                          out_dir=os.path.join(d, "run"), progress=False, device=str(device))
        t0 = time.perf_counter()
        res = train(cfg, dataset=ds, log=lambda s: None)
        wall = time.perf_counter() - t0
    assert res.status == "finished"
    return [r["images_per_s"] for r in res.history], wall


def pretraining(model_name, ds, batch, epochs, lr, device, stats_every, projector) -> list[float]:
    """Images/s per epoch of `largebatch pretrain` (Barlow Twins) on the same backbone."""
    from largebatch.train.pretrain import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as d:
        cfg = PretrainConfig(model=model_name, optimizer="lars", lr=lr, lr_scaling="none", batch_size=batch,
                             epochs=epochs, schedule="cosine", warmup_epochs=1, stats_every=stats_every,
                             projector=projector, knn_every=0, out_dir=os.path.join(d, "run"), progress=False,
                             device=str(device))
        res = pretrain(cfg, dataset=ds, log=lambda s: None)
    assert res.status == "finished"
    return [r["images_per_s"] for r in res.history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,resnet18", help="comma-separated subset of " + ", ".join(SETUPS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stats-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--projector", default="1024-1024", help="pre-training projector widths (default: 1024-1024)")
    ap.add_argument("--no-pretrain", action="store_true", help="skip the pre-training column")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {device}{gpu}, load average before {os.getloadavg()[0]:.2f}")
    print("| model | global batch | steps/epoch | bare loop, best (img/s) | harness, best (img/s) | harness / bare | "
          f"pretrain, best (img/s; projector {args.projector}) | pretrain / harness | all runs (median over epochs 2..E) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model_name, shape, classes, n, batch, epochs, lr = SETUPS[name]
        if device.type == "cuda":  # a GPU needs far more work per measurement
            n, batch = n * 8, batch * (2 if name == "mlp" else 4)
        ds = random_dataset(shape, classes, n)
        bare_loop(model_name, ds, batch, 2, lr, device)  # untimed: compiles the optimizer kernels, warms caches
        got: dict[str, list[float]] = {"bare": [], "harness": [], "pretrain": []}
        for r in range(args.repeats):  # alternate which one goes first
            runs = [("bare", lambda: bare_loop(model_name, ds, batch, epochs, lr, device)),
                    ("harness", lambda: harness(model_name, ds, batch, epochs, lr, device, args.stats_every)[0])]
            if not args.no_pretrain:
                runs.append(("pretrain", lambda: pretraining(model_name, ds, batch, epochs, 0.2 * lr, device,
                                                             args.stats_every, args.projector)))
            for kind, fn in (runs if r % 2 == 0 else runs[::-1]):
                got[kind].append(statistics.median(fn()[1:]))
        # best of N: load from other processes only ever slows a run down
        b, h = max(got["bare"]), max(got["harness"])
        p = max(got["pretrain"]) if got["pretrain"] else float("nan")
        spe = steps_per_epoch(n, batch, 1)
        print(f"| {name} | {batch} | {spe} | {b:.0f} | {h:.0f} | {h / b:.3f} | {p:.0f} | {p / h:.3f} | "
              + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vs)}" for k, vs in got.items() if vs) + " |",
              flush=True)


if __name__ == "__main__":
    main()
