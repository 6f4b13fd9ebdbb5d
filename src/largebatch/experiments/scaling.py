"""Time-dependent knobs mapped from the paper's run length to a shorter (mini) run.

TVLARS's ``lam`` is per optimizer step and its ``delay`` and the warm-up are in epochs, so a run
with fewer steps than the paper's would keep the paper's values but not their effect: ``phi(t)``
(TVLARS eq. 8) would barely decay, the warm-up would cover a different share of the run. The mapping
keeps what the paper's run sees:

- ``lam x total steps`` equal to the paper's (the decay covers the same share of the run),
- the delay and the warm-up as the same fraction of the run.

The paper's run: 100 epochs (the authors' classification runs) of CIFAR-10's 50,000 images,
``floor(50000 / B)`` optimizer steps per epoch (the last incomplete batch dropped).
"""

from __future__ import annotations

import math

PAPER_TRAIN = 50_000  # CIFAR-10 training images
PAPER_EPOCHS = 100
#: TVLARS 000 Sec. VI-C1: "gamma_min is set to B/B_base x 0.001 for both TVLARS and LARS experiment"; B_base is
#: not stated: the smallest batch of Table 1 (512) is used.
B_BASE = 512


def steps(n_train: int, batch: int, epochs: float) -> int:
    """Optimizer steps of a run (the last incomplete batch of each epoch dropped)."""
    return int(max(1, n_train // batch) * epochs)


def paper_steps(batch: int, epochs: int = PAPER_EPOCHS, n_train: int = PAPER_TRAIN) -> int:
    return steps(n_train, batch, epochs)


def epochs_for_steps(target_steps: int, n_train: int, batch: int) -> int:
    """The number of epochs of ``n_train`` images at ``batch`` closest to ``target_steps`` optimizer steps."""
    return max(1, round(target_steps / max(1, n_train // batch)))


def gamma_min(batch: int, base: int = B_BASE) -> float:
    """TVLARS 000 Sec. VI-C1's lower LR bound ``B / B_base x 0.001`` (TVLARS: added to phi; LARS: cosine's end)."""
    return batch / base * 0.001


def warmup_epochs(paper_warmup: float, paper_epochs: float, epochs: float) -> float:
    """The paper's warm-up as the same fraction of a run of ``epochs``."""
    return round(paper_warmup / paper_epochs * epochs, 4)


def map_lam(lam: float, paper_total_steps: int, run_total_steps: int) -> float:
    """``lam`` for a run of ``run_total_steps`` such that ``lam x total steps`` equals the paper's."""
    return float(f"{lam * paper_total_steps / run_total_steps:.6g}")


def tvlars_knobs(batch: int, n_train: int, epochs: float, lam: float = 1e-4, delay_epochs: float = 10,
                 paper_epochs: float = PAPER_EPOCHS, paper_train: int = PAPER_TRAIN) -> dict:
    """TVLARS's ``tvlars_lam`` and ``tvlars_delay_epochs`` for a run of ``epochs`` over ``n_train`` images at
    ``batch``, such that ``lam x total steps`` and the delay's share of the run equal the paper's."""
    t_paper, t_run = steps(paper_train, batch, paper_epochs), steps(n_train, batch, epochs)
    return dict(tvlars_lam=map_lam(lam, t_paper, t_run),
                tvlars_delay_epochs=round(delay_epochs / paper_epochs * epochs, 4))


def phi_end(lam: float, delay_steps: float, total_steps: int, alpha: float = 1.0) -> float:
    """``phi`` at the last step (eq. 8 without gamma_min)."""
    return 1.0 / (alpha + math.exp(lam * (total_steps - delay_steps)))


def describe_mapping(batch: int, n_train: int, epochs: float, lam: float = 1e-4, delay_epochs: float = 10,
                     warmup: float | None = None, paper_epochs: float = PAPER_EPOCHS,
                     paper_train: int = PAPER_TRAIN) -> str:
    """One line: the paper's knobs, this run's, and what they preserve (printed with the run's settings)."""
    t_paper, t_run = steps(paper_train, batch, paper_epochs), steps(n_train, batch, epochs)
    k = tvlars_knobs(batch, n_train, epochs, lam, delay_epochs, paper_epochs, paper_train)
    spe_p, spe_r = max(1, paper_train // batch), max(1, n_train // batch)
    end_p = phi_end(lam, delay_epochs * spe_p, t_paper)
    end_r = phi_end(k["tvlars_lam"], k["tvlars_delay_epochs"] * spe_r, t_run)
    parts = [f"B = {batch}: paper {paper_epochs:g} epochs = {t_paper} steps, this run {epochs:g} epochs = {t_run} steps",
             f"TVLARS lam {lam:g} -> {k['tvlars_lam']:g} (lam x steps {lam * t_paper:.3g} in both)",
             f"delay {delay_epochs:g} -> {k['tvlars_delay_epochs']:g} epochs",
             f"phi at the end {end_p:.3f} (paper) / {end_r:.3f} (this run)"]
    if warmup is not None:
        parts.append(f"warm-up {warmup:g} -> {warmup_epochs(warmup, paper_epochs, epochs):g} epochs")
    parts.append(f"gamma_min {gamma_min(batch):g}")
    return "; ".join(parts) + "."
