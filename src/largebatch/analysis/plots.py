"""Matplotlib figures in the style of the LALC paper's Fig. 1a/1b (explosion rate) and Fig. 3 (dynamics)."""

from __future__ import annotations

import math

import numpy as np

from ..plotting import pyplot, save_figure
from . import theory

plt = pyplot()


def plot_rates(results: list[dict], path: str, title: str = "Gradient explosion rate at initialization") -> str:
    """Fig. 1a style: ``sqrt(Var(g^n)/Var(g^N))`` vs normalized blocks from the output (log y),
    one line per result (mean over seeds, band = std), with the ``sqrt(pi/(pi-1))`` slope."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    max_n = 1
    for r in results:
        m = np.asarray(r["rate_mean"])[::-1]
        s = np.asarray(r["rate_std"])[::-1]
        n = np.arange(len(m))
        max_n = max(max_n, len(m) - 1)
        label = f"{r['arch']} / {r['act']}  (factor {r['factor_mean']:.3f})"
        ax.plot(n, m, marker=".", label=label)
        ax.fill_between(n, np.maximum(m - s, 1e-12), m + s, alpha=0.2)
    n = np.arange(max_n + 1)
    ax.plot(n, math.sqrt(theory.THM1_FACTOR) ** n, "k--", lw=1, label=r"$\sqrt{\pi/(\pi-1)}^{\,n}$ (Thm. 1)")
    ax.set_yscale("log")
    ax.set_xlabel("normalized blocks from the output  (N - n)")
    ax.set_ylabel(r"$\sqrt{Var(g^n)/Var(g^N)}$")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def plot_activation_factors(results: list[dict], path: str, title: str = "Per-block variance factor by activation") -> str:
    """Fig. 1b style bar chart: measured per-block factor (mean, std over seeds) per activation,
    with the Gaussian prediction ``E[f'^2]/Var f`` where available."""
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['act']}\n{r['arch']}" if len({q['arch'] for q in results}) > 1 else r["act"] for r in results]
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r["factor_mean"] for r in results], 0.4, yerr=[r["factor_std"] for r in results],
           label="measured", color="tab:blue")
    th = [r.get("factor_theory") for r in results]
    ax.bar(x + 0.2, [t if t is not None else np.nan for t in th], 0.4, label=r"theory $E[f'^2]/Var f$",
           color="tab:orange")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(theory.THM1_FACTOR, color="k", ls="--", lw=0.8, label=r"$\pi/(\pi-1)$")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(r"$Var(g^n)/Var(g^{n+1})$")
    ax.set_ylim(0.8, max(1.6, max(r["factor_mean"] for r in results) + 0.1))
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


_LABELS = {
    "var_g": "Var(g)  (grad. w.r.t. BN output)", "var_pre": "Var before BN (after W)",
    "var_x": "Var(x) at BN output", "var_act": "Var after activation", "var_w": "Var(W)",
    "mean_std": "|mean|/std at BN output", "corr_xg": "mean |Corr(x_i, g_i)|",
    "corr_xx": "mean |Corr(x_i, x_j)|, i != j",
}


def plot_dynamics(result: dict, path: str) -> str:
    """Fig. 3 style panels: each metric vs block (left = output), one line per logged step."""
    metrics = list(_LABELS)
    fig, axes = plt.subplots(2, 5, figsize=(19, 7.5), constrained_layout=True)
    steps = result["steps"]
    cmap = plt.get_cmap("viridis")
    for ax, m in zip(axes.flat, metrics):
        for i, s in enumerate(steps):
            vals = np.asarray(result["metrics"][m][i])[::-1]
            ax.plot(np.arange(len(vals)), vals, color=cmap(i / max(1, len(steps) - 1)), lw=1)
        if m.startswith("var"):
            ax.set_yscale("log")
        ax.set_title(_LABELS[m], fontsize=9)
        ax.set_xlabel("block from output", fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes.flat[len(metrics)]
    ax.plot(steps, result["loss"], "k.-")
    ax.set_title("training loss", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_yscale("log")
    ax = axes.flat[len(metrics) + 1]
    vg = np.asarray(result["metrics"]["var_g"])
    ax.plot(steps, (vg[:, 0] / vg[:, -1]) ** (1.0 / (vg.shape[1] - 1)), "k.-", label="measured")
    ax.axhline(theory.THM1_FACTOR, color="k", ls="--", lw=0.8, label=r"$\pi/(\pi-1)$")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_title(r"per-block factor $(Var(g^1)/Var(g^N))^{1/(N-1)}$", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=7)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(steps[0], steps[-1]))
    fig.colorbar(sm, ax=axes, label="training step", shrink=0.6)
    c = result["config"]
    fig.suptitle(f"Early-training dynamics: {c['norm'].upper()} MLP depth {c['depth']} width {c['width']} "
                 f"{c['act']}, init N(0,{c['init_std']}^2), SGD lr {c['lr']} batch {c['batch']} on {c['data']}")
    return save_figure(fig, path, dpi=110, tight=False)


def plot_prop1(rows: list[dict], path: str) -> str:
    """Proposition 1 closed forms (lines) vs Monte Carlo (markers) over ``mu`` for each ``sigma``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for sigma in sorted({r["sigma"] for r in rows}):
        rs = sorted((r for r in rows if r["sigma"] == sigma), key=lambda r: r["mu"])
        mu = np.array([r["mu"] for r in rs])
        grid = np.linspace(mu.min(), mu.max(), 200)
        for ax, key, fn in ((axes[0], "mean", theory.relu_gaussian_mean), (axes[1], "var", theory.relu_gaussian_var)):
            line, = ax.plot(grid, fn(grid, sigma), lw=1, label=f"sigma={sigma:g} (eq. {1 if key == 'mean' else 2})")
            ax.plot(mu, [r[f"{key}_mc"] for r in rs], "o", color=line.get_color(), ms=4)
    axes[0].set_title("E[ReLU(N(mu, sigma^2))]: closed form (line) vs Monte Carlo (dots)")
    axes[1].set_title("Var[ReLU(N(mu, sigma^2))]")
    for ax in axes:
        ax.set_xlabel("mu")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)
