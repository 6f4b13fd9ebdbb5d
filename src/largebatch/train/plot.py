"""``largebatch plot RUN_DIR...``: curves of one or more runs (matplotlib, Agg backend).

Writes into ``--out`` (default: the first run directory):

- ``curves.png``: test accuracy and loss (train loss dotted) vs epoch, one colour per run; for
  pre-training runs the kNN accuracy and the Barlow Twins loss;
- ``lr.png``: the learning rate of each step per run (TVLARS: ``lr`` and the applied
  ``lr * phi(t)``, both named);
- ``layers-<run>.png``: the TVLARS paper's Fig. 3 panels for each run with layer statistics: LWN
  ``||w||``, LGN ``||g||``, LNR ``||w||/||g||`` and the per-layer learning rate applied, per layer
  (named by module) vs step.
- ``noise-scale.png``: for runs trained with ``--noise-scale``, the gradient noise scale ``B_simple``
  per step beside the batch size the run used (dashed, same colour; docs/batch-size.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

from ..plotting import pyplot, save_figure


def _table(run_dir: str, base: str) -> list[dict]:
    """The rows of ``run_dir/base.csv`` (or ``.jsonl``); [] when absent. A file that is not a table of
    ours is a ``ValueError`` naming it."""
    from .rundir import read_table  # imports torch: not at module level (`largebatch plot --help`)

    for ext in (".csv", ".jsonl"):
        p = os.path.join(run_dir, base + ext)
        if os.path.exists(p):
            try:
                rows = read_table(p)
            except UnicodeDecodeError:
                raise ValueError(f"{p} is not a text table (not written by largebatch train?)") from None
            except (ValueError, OSError) as e:
                raise ValueError(str(e).splitlines()[0] if str(e).startswith(p) else f"{p}: {e}") from None
            if rows and (not all(isinstance(r, dict) for r in rows) or "epoch" not in rows[0] and "step" not in rows[0]):
                raise ValueError(f"{p} has no epoch or step column (not written by largebatch train?)")
            return rows
    return []


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str:
    """Accuracy and loss per epoch. Classification runs: test accuracy, test loss (train dotted);
    pre-training runs (``largebatch pretrain``): kNN accuracy and the Barlow Twins training loss.
    Each panel has its own legend: colour = run, line style = which loss."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    labels = labels or [_label(d) for d in run_dirs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.6))
    kinds = set()
    for i, (d, lab) in enumerate(zip(run_dirs, labels)):
        rows = _table(d, "metrics")
        if not rows:
            raise ValueError(f"run_dir: {d} has no metrics.csv / metrics.jsonl (no finished epoch yet?)")
        missing = [k for k in ("epoch", "train_loss") if k not in rows[0]]
        if missing or not ({"test_acc", "knn_acc"} & set(rows[0])):
            raise ValueError(f"run_dir: {d}'s metrics table lacks {', '.join(missing) or 'test_acc / knn_acc'} "
                             f"(not written by largebatch train or pretrain?)")
        ep = [r["epoch"] for r in rows]
        c = f"C{i % 10}"
        acc = "test_acc" if "test_acc" in rows[0] else "knn_acc"
        kinds.add(acc)
        pts = [(e, 100 * r[acc]) for e, r in zip(ep, rows) if isinstance(r.get(acc), (int, float))
               and r[acc] == r[acc]]  # the kNN monitor is NaN between its epochs
        ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=".", label=lab)
        if "test_loss" in rows[0]:
            ax_loss.plot(ep, [r["test_loss"] for r in rows], color=c, marker=".")
            ax_loss.plot(ep, [r["train_loss"] for r in rows], color=c, linestyle=":")
        else:
            ax_loss.plot(ep, [r["train_loss"] for r in rows], color=c, linestyle="--")
    name = {"test_acc": "test accuracy", "knn_acc": "kNN accuracy (pre-training monitor)"}
    acc_name = " / ".join(name[k] for k in sorted(kinds, reverse=True))
    ax_acc.set(xlabel="epoch", ylabel=f"{acc_name} (%)", title=acc_name[0].upper() + acc_name[1:])
    # the loss panel: colours are the runs (as on the left), line styles say which loss
    styles = []
    if "test_acc" in kinds:
        styles += [("-", ".", "test loss"), (":", None, "train loss")]
    if "knn_acc" in kinds:
        styles += [("--", None, "Barlow Twins loss (train)")]
    title = {frozenset({"test_acc"}): "Loss: test (solid) and train (dotted)",
             frozenset({"knn_acc"}): "Barlow Twins training loss"}.get(frozenset(kinds), "Loss")
    handles = [Line2D([], [], color=f"C{i % 10}", label=lab) for i, lab in enumerate(labels)]
    handles += [Line2D([], [], color="0.3", linestyle=ls, marker=m, label=t) for ls, m, t in styles]
    ax_loss.set(xlabel="epoch", ylabel="loss (log scale)", title=title, yscale="log")
    ax_loss.legend(handles=handles, fontsize=9)
    ax_acc.legend(fontsize=9)
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        _integer_ticks(ax)
    return save_figure(fig, path, dpi=110)


def plot_lr(run_dirs: list[str], path: str, labels: list[str] | None = None) -> str:
    """The learning rate of each step, per run: the group's ``lr`` (what the console prints) and,
    where the optimizer scales it in time (TVLARS: ``lr * phi(t)``, docs/algorithms.md), the LR
    applied, both named in the legend. Layer-wise trust ratios come on top (``layers-*.png``)."""
    plt = pyplot()
    labels = labels or [_label(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for i, (d, lab) in enumerate(zip(run_dirs, labels)):
        rows = _table(d, "steps")
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        lr, applied = [r["lr"] for r in rows], [r["lr_eff"] for r in rows]
        scaled = any(abs(a - b) > 1e-12 * max(abs(b), 1e-30) for a, b in zip(applied, lr))
        if scaled:
            ax.plot(steps, lr, color=f"C{i % 10}", linestyle="--", label=f"{lab}: lr")
            ax.plot(steps, applied, color=f"C{i % 10}", label=f"{lab}: lr x phi(t), applied")
        else:
            ax.plot(steps, lr, color=f"C{i % 10}", label=f"{lab}: lr")
    ax.set(xlabel="step", ylabel="learning rate (before the trust ratio)", title="Learning rate vs step",
           yscale="log")
    ax.grid(alpha=0.3)
    _integer_ticks(ax)
    ax.legend(fontsize=9)
    return save_figure(fig, path, dpi=110)


def layer_labels(run_dir: str, names: list[str]) -> dict[str, str]:
    """Readable names of the parameters ``names`` (``1.weight``): ``L<k> <module type> <module
    path>``, k counting the adapted layers from the input; the type comes from the run's model
    (rebuilt on the meta device from its config.yaml), the path is left out where it is only a
    position in a ``Sequential`` (the MLP). Without a readable config: ``L<k> <module path>``."""
    modules: dict = {}
    try:
        import torch

        from .config import load_file
        from ..models import build_model

        cfg = load_file(os.path.join(run_dir, "config.yaml"))
        with torch.device("meta"):
            model = build_model(cfg.get("model", "mlp"), 10, (3, 32, 32), stem=cfg.get("stem", "cifar"),
                                mlp_depth=cfg.get("mlp_depth", 3), mlp_width=cfg.get("mlp_width", 256),
                                activation=cfg.get("activation", "relu"),
                                mlp_batchnorm=cfg.get("mlp_batchnorm", True))
        modules = dict(model.named_modules())
    except Exception:  # an unreadable or foreign config: the parameter names alone
        pass
    out = {}
    last = len(names)
    for k, name in enumerate(names, 1):
        path = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        m = modules.get(path)
        kind = type(m).__name__ if m is not None else ""
        where = "" if path.replace(".", "").isdigit() and kind else path
        tail = " (output)" if k == last and kind == "Linear" and not where else ""
        out[name] = " ".join(x for x in (f"L{k}", kind, where) if x) + tail
    return out


def plot_layers(run_dir: str, path: str, title: str | None = None) -> str | None:
    """Fig. 3 panels of the TVLARS paper (LWN, LGN, LNR, per-layer LR) for the adapted layers of one
    run; None if no stats. Up to 12 layers: one legend of module names beside the panels; more: the
    colour runs from the input (dark) to the output (light) on a colour bar."""
    rows = [r for r in _table(run_dir, "layer_stats") if int(r["adapt"]) == 1]
    if not rows:
        return None
    plt = pyplot()
    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s = series[r["layer"]]
        for k in ("step", "w_norm", "g_norm", "lnr", "layer_lr"):
            s[k].append(r[k])
    names = layer_labels(run_dir, list(series))
    n = len(series)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))
    panels = (("w_norm", "LWN  ||w||"), ("g_norm", "LGN  ||g||"), ("lnr", "LNR  ||w|| / ||g||"),
              ("layer_lr", "per-layer LR applied"))
    cmap = plt.get_cmap("viridis")
    for ax, (key, name) in zip(axes, panels):
        for j, (layer, s) in enumerate(series.items()):
            ax.plot(s["step"], s[key], color=cmap(j / max(n - 1, 1)), label=names[layer], linewidth=1.2)
        ax.set(xlabel="step", title=name, yscale="log")
        ax.grid(alpha=0.3)
        _integer_ticks(ax)
    fig.suptitle(title or f"Layer statistics: {_label(run_dir)}")
    fig.tight_layout(rect=(0, 0, 0.86 if n <= 12 else 0.97, 1))
    if n <= 12:
        handles, labs = axes[0].get_legend_handles_labels()
        fig.legend(handles, labs, loc="center left", bbox_to_anchor=(0.865, 0.5), fontsize=9,
                   title="layer (input to output)", title_fontsize=9)
    else:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        first, last = names[next(iter(series))], names[list(series)[-1]]
        from matplotlib.ticker import MaxNLocator

        bar = fig.colorbar(ScalarMappable(Normalize(1, n), cmap), ax=list(axes), fraction=0.02, pad=0.02)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
        bar.set_label(f"adapted layer: 1 = {first} ... {n} = {last}", fontsize=8)
    return save_figure(fig, path, dpi=110, tight=False)


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
    """Every figure of ``run_dirs`` into the folder ``out``; ``ValueError`` (nothing created) for
    a run directory that is missing or has no metrics, or an ``out`` that is not a folder."""
    for d in run_dirs:
        if not os.path.isdir(d):
            raise ValueError(f"run_dir: {d} is not a directory (give folders written by largebatch train)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out} exists and is not a folder; give a folder for the figures")
    labels = labels or [_label(d) for d in run_dirs]
    tables = {d: _table(d, "metrics") for d in run_dirs}  # read (and refuse) before writing anything
    empty = [d for d, rows in tables.items() if not rows]
    if empty:
        raise ValueError(f"run_dir: {empty[0]} has no metrics.csv / metrics.jsonl (no finished epoch yet?)")
    try:
        os.makedirs(out, exist_ok=True)
        made = [plot_curves(run_dirs, os.path.join(out, "curves.png"), labels),
                plot_lr(run_dirs, os.path.join(out, "lr.png"), labels)]
        for d, lab in zip(run_dirs, labels):
            p = plot_layers(d, os.path.join(out, f"layers-{lab}.png"), title=f"Layer statistics: {lab}")
            if p:
                made.append(p)
        p = plot_noise_scale(run_dirs, os.path.join(out, "noise-scale.png"), labels)
        if p:
            made.append(p)
    except OSError as e:
        raise ValueError(f"--out: cannot write figures into {out} ({e.strerror or e})") from None
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
