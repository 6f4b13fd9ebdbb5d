"""``largebatch plot RUN_DIR...``: curves of one or more runs (matplotlib, Agg backend).

Writes into ``--out`` (default: the first run directory):

- ``curves.png``: test accuracy and loss (train loss dotted) vs epoch, one colour per run; for
  pre-training runs the kNN accuracy and the Barlow Twins loss;
- ``lr.png``: the learning rate applied at each step (TVLARS: ``lr * phi(t)``) per run;
- ``layers-<run>.png``: seed 000 Fig. 3 panels for each run with layer statistics: LWN ``||w||``,
  LGN ``||g||``, LNR ``||w||/||g||`` and the per-layer learning rate applied, per layer vs step;
- ``noise-scale.png``: for runs trained with ``--noise-scale``, the gradient noise scale ``B_simple``
  per step beside the batch size the run used (dashed, same colour; docs/batch-size.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from ..plotting import pyplot, save_figure
from .rundir import read_table


def _table(run_dir: str, base: str) -> list[dict]:
    for ext in (".csv", ".jsonl"):
        p = os.path.join(run_dir, base + ext)
        if os.path.exists(p):
            return read_table(p)
    return []


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def plot_curves(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str:
    """Accuracy and loss per epoch. Classification runs: test accuracy, test loss (train dotted);
    pre-training runs (``largebatch pretrain``): kNN accuracy and the Barlow Twins training loss."""
    plt = pyplot()
    labels = labels or [_label(d) for d in run_dirs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    kinds = set()
    for i, (d, lab) in enumerate(zip(run_dirs, labels)):
        rows = _table(d, "metrics")
        if not rows:
            raise ValueError(f"run_dir: {d} has no metrics.csv / metrics.jsonl")
        ep = [r["epoch"] for r in rows]
        c = f"C{i % 10}"
        acc = "test_acc" if "test_acc" in rows[0] else "knn_acc"
        kinds.add(acc)
        pts = [(e, 100 * r[acc]) for e, r in zip(ep, rows) if isinstance(r.get(acc), (int, float))
               and r[acc] == r[acc]]  # the kNN monitor is NaN between its epochs
        ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=".", label=lab)
        if "test_loss" in rows[0]:
            ax_loss.plot(ep, [r["test_loss"] for r in rows], color=c, marker=".", label=f"{lab} (test)")
            ax_loss.plot(ep, [r["train_loss"] for r in rows], color=c, linestyle=":", label=f"{lab} (train)")
        else:
            ax_loss.plot(ep, [r["train_loss"] for r in rows], color=c, marker=".", label=f"{lab} (train)")
    name = {"test_acc": "test accuracy", "knn_acc": "kNN accuracy"}
    acc_name = " / ".join(name[k] for k in sorted(kinds, reverse=True))
    ax_acc.set(xlabel="epoch", ylabel=f"{acc_name} (%)", title=acc_name[0].upper() + acc_name[1:])
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss (solid: test or pre-training, dotted: train)",
                yscale="log")
    ax_acc.legend(fontsize=8)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=110)


def plot_lr(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str:
    plt = pyplot()
    labels = labels or [_label(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (d, lab) in enumerate(zip(run_dirs, labels)):
        rows = _table(d, "steps")
        if rows:
            ax.plot([r["step"] for r in rows], [r["lr_eff"] for r in rows], color=f"C{i % 10}", label=lab)
    ax.set(xlabel="step", ylabel="learning rate (before trust ratio)", title="Learning rate vs step", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_layers(run_dir: str, path: str, title: str | None = None) -> str | None:
    """Fig. 3 panels (LWN, LGN, LNR, per-layer LR) for the adapted layers of one run; None if no stats."""
    rows = [r for r in _table(run_dir, "layer_stats") if int(r["adapt"]) == 1]
    if not rows:
        return None
    plt = pyplot()
    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s = series[r["layer"]]
        for k in ("step", "w_norm", "g_norm", "lnr", "layer_lr"):
            s[k].append(r[k])
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("w_norm", "LWN  ||w||"), ("g_norm", "LGN  ||g||"), ("lnr", "LNR  ||w|| / ||g||"),
              ("layer_lr", "per-layer LR applied"))
    cmap = plt.get_cmap("viridis")
    n = len(series)
    for ax, (key, name) in zip(axes, panels):
        for j, (layer, s) in enumerate(series.items()):
            ax.plot(s["step"], s[key], color=cmap(j / max(n - 1, 1)), label=layer, linewidth=1)
        ax.set(xlabel="step", title=name, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=1 if n <= 12 else 2)
    fig.suptitle(title or f"Layer statistics: {_label(run_dir)}")
    return save_figure(fig, path, dpi=110)


def _batch_size(run_dir: str) -> int | None:
    p = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(p):
        return None
    import yaml

    with open(p) as f:
        return (yaml.safe_load(f) or {}).get("batch_size")


def plot_noise_scale(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str | None:
    """The smoothed noise scale ``B_simple`` per step and the run's batch size; None if no run has it."""
    labels = labels or [_label(d) for d in run_dirs]
    series = [(d, lab, [r for r in _table(d, "steps") if isinstance(r.get("noise_scale"), (int, float))])
              for d, lab in zip(run_dirs, labels)]
    if not any(rows for _, _, rows in series):
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (d, lab, rows) in enumerate(series):
        if not rows:
            continue
        c = f"C{i % 10}"
        ax.plot([r["step"] for r in rows], [r["noise_scale"] for r in rows], color=c, label=f"{lab}: B_simple")
        b = _batch_size(d)
        if b:
            ax.axhline(b, color=c, linestyle="--", linewidth=1, label=f"{lab}: batch size {b}")
    ax.set(xlabel="step", ylabel="examples", title="Gradient noise scale (EMA) vs batch size", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> list[str]:
    os.makedirs(out, exist_ok=True)
    labels = labels or [_label(d) for d in run_dirs]
    made = [plot_curves(run_dirs, os.path.join(out, "curves.png"), labels),
            plot_lr(run_dirs, os.path.join(out, "lr.png"), labels)]
    for d, lab in zip(run_dirs, labels):
        p = plot_layers(d, os.path.join(out, f"layers-{lab}.png"), title=f"Layer statistics: {lab}")
        if p:
            made.append(p)
    p = plot_noise_scale(run_dirs, os.path.join(out, "noise-scale.png"), labels)
    if p:
        made.append(p)
    return made


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by largebatch train")
    parser.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per RUN_DIR")


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        print(f"largebatch plot: --labels has {len(labels)} names for {len(args.run_dirs)} run directories",
              file=sys.stderr)
        return 2
    try:
        made = plot_runs(args.run_dirs, args.out or args.run_dirs[0], labels)
    except ValueError as e:
        print(f"largebatch plot: {e}", file=sys.stderr)
        return 2
    for p in made:
        print(p)
    return 0
