"""Early-training dynamics of a BN network (LALC paper, Fig. 3).

A ``NormMLP`` (``x^{n+1} = BN(W^n f(x^n))``) with all weights drawn from ``N(0, init_std^2)``
(the paper uses ``0.01``) is trained with SGD on scikit-learn's offline ``digits`` data (or a
synthetic teacher task). At every logged step, from the same forward/backward pass as the
update, each normalized block ``n`` records:

* ``var_g``   mean over units of ``Var_batch(g^n_i)``, ``g^n = dL/dx^n`` (the explosion quantity);
* ``var_pre`` variance of the pre-normalization activation ``W^n f(x^{n-1})`` (BN input);
* ``var_x``   variance of the BN output (about 1 by construction);
* ``var_act`` variance after the activation ``f(x^n)``;
* ``var_w``   variance of the weight ``W^n`` that feeds block ``n``;
* ``mean_std`` mean over units of ``|mean_b x_i| / std_b x_i`` at the BN output (the
  pseudo-linearity of the following ReLU, Corollary 2);
* ``corr_xg`` ``sum_i |Corr(x_i, g_i)| / C``;
* ``corr_xx`` ``sum_{i != j} |Corr(x_i, x_j)| / (C (C-1))`` (correlation between activations,
  the factor Theorem 2 is about).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import architectures as A
from .explosion import record_blocks

METRICS = ("var_g", "var_pre", "var_x", "var_act", "var_w", "mean_std", "corr_xg", "corr_xx")


def load_data(name: str, seed: int = 0, n: int = 4096, dim: int = 64, classes: int = 10):
    """``digits`` (scikit-learn, offline, 1797 x 64, standardized) or ``synthetic``
    (Gaussian inputs labelled by a random 2-layer teacher)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        return x, torch.tensor(d.target, dtype=torch.long)
    if name == "synthetic":
        g = torch.Generator().manual_seed(1234 + seed)
        x = torch.randn(n, dim, generator=g)
        w1 = torch.randn(dim, 4 * dim, generator=g) / dim ** 0.5
        w2 = torch.randn(4 * dim, classes, generator=g)
        return x, (torch.relu(x @ w1) @ w2).argmax(1)
    raise ValueError(f"data must be 'digits' or 'synthetic', got {name!r}")


def _corr_abs_mean(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Mean ``|Corr|`` between matching columns of ``a`` and ``b``, or between distinct columns of ``a``."""
    a = a - a.mean(0)
    sa = a.norm(dim=0).clamp_min(1e-12)
    if b is not None:
        b = b - b.mean(0)
        sb = b.norm(dim=0).clamp_min(1e-12)
        return float(((a * b).sum(0) / (sa * sb)).abs().mean())
    c = (a.T @ a) / torch.outer(sa, sa)
    k = c.shape[0]
    return float((c.abs().sum() - c.diagonal().abs().sum()) / (k * (k - 1)))


def track_dynamics(depth: int = 10, width: int = 128, act: str = "relu", steps: int = 200,
                   log_every: int = 10, batch: int = 256, lr: float = 0.1, momentum: float = 0.9,
                   init_std: float = 0.01, data: str = "digits", seed: int = 0, norm: str = "bn") -> dict:
    """Train for ``steps`` SGD steps and record :data:`METRICS` per block every ``log_every`` steps."""
    for k, v in dict(steps=steps, log_every=log_every, batch=batch).items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    if batch < 2:
        raise ValueError(f"batch must be >= 2, got {batch}")
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    torch.manual_seed(seed)
    x_all, y_all = load_data(data, seed)
    classes = int(y_all.max()) + 1
    body = A.NormMLP(x_all.shape[1], width, depth, act, norm)
    head = nn.Linear(width, classes)
    model = nn.Sequential(body, head)
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, init_std)
                if m.bias is not None:
                    m.bias.zero_()
    act_fn = A.make_activation(act).eval()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    logged_steps, loss_hist, acc_hist = [], [], []
    metrics = {m: [] for m in METRICS}
    names = None
    for step in range(steps + 1):
        idx = torch.randint(len(x_all), (min(batch, len(x_all)),), generator=gen)
        xb, yb = x_all[idx], y_all[idx]
        log = step % log_every == 0 or step == steps
        model.train()
        opt.zero_grad(set_to_none=True)
        if log:
            with record_blocks(body) as recs:
                out = model(xb)
                loss = nn.functional.cross_entropy(out, yb)
                loss.backward()
            names = [r["name"] for r in recs]
            row = {m: [] for m in METRICS}
            for r, lin in zip(recs, linears):
                xo, g, pre = r["out"].double(), r["grad"].double(), r["inp"].double()
                sd = xo.std(0).clamp_min(1e-12)
                row["var_g"].append(float(g.var(0).mean()))
                row["var_pre"].append(float(pre.var(0).mean()))
                row["var_x"].append(float(xo.var(0).mean()))
                row["var_act"].append(float(act_fn(xo).var(0).mean()))
                row["var_w"].append(float(lin.weight.detach().double().var()))
                row["mean_std"].append(float((xo.mean(0).abs() / sd).mean()))
                row["corr_xg"].append(_corr_abs_mean(xo, g))
                row["corr_xx"].append(_corr_abs_mean(xo))
            for m in METRICS:
                metrics[m].append(row[m])
            logged_steps.append(step)
            loss_hist.append(float(loss.detach()))
            acc_hist.append(float((out.argmax(1) == yb).float().mean()))
        else:
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
        if step < steps:
            opt.step()
    return {
        "config": dict(depth=depth, width=width, act=act, steps=steps, log_every=log_every, batch=batch,
                       lr=lr, momentum=momentum, init_std=init_std, data=data, seed=seed, norm=norm,
                       optimizer="torch.optim.SGD"),
        "blocks": names, "steps": logged_steps, "loss": loss_hist, "acc": acc_hist,
        "metrics": metrics,
    }


def summarize(result: dict) -> list[dict]:
    """Per logged step: the per-block factor of ``var_g`` (input half vs output half, as
    ``(Var(g^1)/Var(g^N))^(1/(N-1))``), mean ``corr_xx`` and mean ``mean_std``."""
    rows = []
    for i, s in enumerate(result["steps"]):
        vg = np.asarray(result["metrics"]["var_g"][i])
        rows.append({
            "step": s, "loss": result["loss"][i], "acc": result["acc"][i],
            "factor": float((vg[0] / vg[-1]) ** (1.0 / (len(vg) - 1))),
            "corr_xx": float(np.mean(result["metrics"]["corr_xx"][i])),
            "corr_xg": float(np.mean(result["metrics"]["corr_xg"][i])),
            "mean_std": float(np.mean(result["metrics"]["mean_std"][i])),
        })
    return rows
