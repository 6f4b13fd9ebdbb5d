"""TVLARS (Do et al.; seeds 000 / 001): Table 1, Figs. 1-3 and the three ablations.

Paper settings, each with the papers' sentence (``PAPER_SETTINGS``; a test checks every paper-scale
run against it): momentum 0.9, weight decay 5e-4, Kaiming-uniform init, the ImageNet stem of
torchvision's ResNets (the authors' code), target LRs per batch from Table 1 (no scaling rule on top),
synchronized BatchNorm, LARS / LAMB "with warm-up": linear warm-up for 20 epochs then cosine to
``gamma_min``, "without warm-up": polynomial decay (power 2), TVLARS: no schedule, ``lam = 1e-4``
(Barlow Twins ``1e-5``), delay 10 epochs, ``alpha = 1``, ``gamma_min = B / B_base x 0.001`` (B_base not
stated: 512, the smallest batch of Table 1). The LAMB and LARS the papers ran (pytorch-optimizer's and
Lightning Flash's: ``lamb-pto``, ``lars-flash``) run beside ours. Not stated and chosen here: 100
classification epochs (the authors' scripts).

Shorter runs (mini, smoke) keep the papers' knobs in proportion (:mod:`largebatch.experiments.scaling`):
warm-up and delay as the same fraction of the run, ``lam x total steps`` as in the paper's run.
Claims are decided by :mod:`largebatch.experiments.verdicts` at Table 1's middle LR of each batch
(fixed in advance: nothing is selected on the test set); claims about replacing warm-up need the
positive control of ``warmup-control``.

Every run that is a Table 1 cell lives in ``tvlars-table1``'s folder and is shared by the figures and
ablations that need it (Fig. 1's warm-up curves, the LR ablation, the ``lam = 1e-4`` curves).
"""

from __future__ import annotations

import math

from .. import engine as E
from .. import scaling
from .. import verdicts as V
from ..engine import Artifact, Ctx, Run
from .common import MINI, MINI_NOTE, N_TRAIN, SMOKE, outcomes, seeded, verdict_section

#: Table 1's target learning rates per global batch size
LRS = {512: (1, 2, 3), 1024: (2, 3, 4), 2048: (5, 6, 7), 4096: (8, 9, 10), 8192: (10, 12, 15), 16384: (15, 17, 19)}
#: Table 1 (001; = 000 Table I), accuracy %: [problem][dataset][optimizer][batch] -> one value per LR of LRS[batch]
PAPER = {
    "clf": {
        "cifar10": {
            "lars": {512: [74.64, 77.49, 79.64], 1024: [74.7, 78.83, 80.52], 2048: [75.22, 79.49, 81.1],
                     4096: [75.63, 80.96, 82.49], 8192: [77.59, 81.75, 82.5], 16384: [79.46, 80.62, 38.57]},
            "lamb": {512: [57.88, 64.76, 78.39], 1024: [52.06, 57.83, 79.98], 2048: [43.12, 47.88, 81.43],
                     4096: [22.32, 37.52, 81.53], 8192: [16.14, 19.85, 81.78], 16384: [14.82, 11.97, 77.16]},
            "tvlars": {512: [78.92, 81.42, 81.56], 1024: [81.84, 82.58, 82.54], 2048: [81.52, 82.22, 82.44],
                       4096: [80.9, 80.96, 81.16], 8192: [81.16, 82.42, 82.74], 16384: [79.2, 80.42, 80.42]},
        },
        "tinyimagenet": {
            "lars": {512: [33.72, 36.6, 38.92], 1024: [33.8, 36.84, 38.52], 2048: [34.48, 38.04, 40.44],
                     4096: [34.24, 38.56, 40.4], 8192: [34.36, 38.12, 42.0], 16384: [35.6, 39.72, 41.72]},
            "lamb": {512: [20.28, 41.4, 37.52], 1024: [16.88, 31.84, 37.76], 2048: [12.6, 18.56, 39.92],
                     4096: [5.24, 10.76, 39.0], 8192: [1.12, 2.48, 39.2], 16384: [0.84, 0.92, 37.28]},
            "tvlars": {512: [37.56, 39.28, 39.64], 1024: [39.6, 39.16, 39.4], 2048: [39.56, 39.56, 41.68],
                       4096: [38.28, 39.96, 41.64], 8192: [36.48, 39.2, 42.32], 16384: [38.56, 40.32, 41.08]},
        },
    },
    "ssl": {  # Barlow Twins, linear-evaluation top-1
        "cifar10": {
            "lars": {512: [51.31, 58.89, 60.76], 1024: [61.13, 67.03, 68.98], 2048: [52.42, 57.35, 52.42],
                     4096: [52.77, 55.74, 55.98], 8192: [50.29, 52.78, 9.65], 16384: [48.27, 48.26, 49.05]},
            "lamb": {512: [10.01, 12.01, 67.31], 1024: [12.03, 15.03, 69.49], 2048: [10.01, 15.64, 60.08],
                     4096: [48.93, 50.19, 53.38], 8192: [42.22, 45.26, 52.39], 16384: [42.26, 44.02, 49.65]},
            "tvlars": {512: [69.96, 69.72, 70.54], 1024: [67.38, 69.8, 71.13], 2048: [62.61, 61.71, 61.05],
                       4096: [57.96, 58.28, 60.46], 8192: [54.14, 53.56, 52.24], 16384: [48.16, 49.84, 50.15]},
        },
        "tinyimagenet": {
            "lars": {512: [18.32, 19.52, 21.12], 1024: [19.96, 19.36, 20.38], 2048: [19.92, 20.33, 19.98],
                     4096: [19.45, 20.2, 20.25], 8192: [19.69, 20.79, 21.62], 16384: [20.97, 21.54, 22.42]},
            "lamb": {512: [13.46, 17.75, 27.37], 1024: [16.44, 16.7, 24.53], 2048: [18.67, 21.98, 23.43],
                     4096: [13.78, 15.66, 21.45], 8192: [19.6, 23.44, 23.55], 16384: [20.34, 23.58, 23.78]},
            "tvlars": {512: [29.02, 31.01, 31.44], 1024: [28.98, 27.46, 28.32], 2048: [26.15, 23.43, 27.08],
                       4096: [24.29, 24.29, 24.92], 8192: [23.41, 23.47, 24.26], 16384: [25.82, 24.95, 25.91]},
        },
    },
}
OPTIMIZERS = ("lars", "lamb", "tvlars")
#: the LAMB and LARS the papers ran (TVLARS 000 Sec. VI-A footnotes 2-3), beside ours in Table 1
VARIANTS = {"lamb-pto": "lamb", "lars-flash": "lars"}
#: every paper-scale setting with the sentence it comes from (tests assert the paper commands carry them)
PAPER_SETTINGS = {
    "warmup_epochs": (20, "001 App. A: 'gamma_t = gamma_target x t/T for each step (T = 20 epochs)'"),
    "tvlars_delay_epochs": (10, "000 Sec. VI-C1: 'd_e, the number of delay epochs is set to 10'"),
    "gamma_min": ("B/512 x 0.001", "000 Sec. VI-C1: 'gamma_min is set to B/B_base x 0.001 for both TVLARS and LARS "
                                   "experiment'; App. A: 'gamma_t = gamma_target x q + gamma_min x (1 - q)'"),
    "sync_bn": (True, "001 App. A: 'multi Geforce 3080 GPUs settings, along with Syncing Batch Normalization'"),
    "weight_decay": (5e-4, "001 App. A: 'w_d, and mu is set to 5 x 10^-4, and 0.9'"),
    "momentum": (0.9, "001 App. A: 'w_d, and mu is set to 5 x 10^-4, and 0.9'"),
    "tvlars_lam": ({"clf": 1e-4, "ssl": 1e-5}, "001 Sec. 5.2.1 / Fig. 4 (classification 1e-4), App. A (Barlow Twins 1e-5)"),
    "lars-nowarmup": ("poly", "001 App. A: 'without a warm-up strategy, a simple Polynomial Decay is applied instead'"),
    "lamb-pto": ("pytorch-optimizer Lamb", "000 Sec. VI-A: 'LAMB Pytorch code ... referenced from Pytorch Optimizer'"),
    "lars-flash": ("Lightning Flash LARS", "000 Sec. VI-A: 'the Pytorch version of LARS ... referenced from Lightning "
                                           "Flash'"),
}
PAPER_EPOCHS = {"clf": 100, "ssl": 1000}
LAMBDAS = (0.01, 0.005, 0.001, 1e-4, 1e-5, 1e-6)  # the decay ablation (001 Sec. 5.2.1, Fig. 4)
INITS = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")  # 000 Fig. 8

# Per scale: the datasets (Table 1 column -> config), the batch sizes, epochs, and the Barlow Twins half.
SCALE = {
    "paper": dict(data={"cifar10": dict(dataset="cifar10", model="resnet18"),
                        "tinyimagenet": dict(dataset="tinyimagenet", model="resnet34")},
                  common=dict(init="kaiming_uniform", stem="imagenet", weight_decay=5e-4, momentum=0.9, sync_bn=True),
                  batches=tuple(LRS), lrs=LRS, epochs=100,
                  ssl=dict(batches=tuple(LRS), lrs=LRS, epochs=1000, linear=100,
                           cfg=dict(projector="2048-2048-4096", lambd=0.0051, lr_scaling="none"))),
    "mini": dict(data={"cifar10": MINI}, common=dict(init="kaiming_uniform", weight_decay=5e-4, momentum=0.9),
                 batches=(1024, 4096, 16384), lrs=LRS, epochs=12,
                 ssl=dict(batches=(4096,), lrs={4096: (9,)}, epochs=5, linear=30,
                          cfg=dict(projector="512-512", lambd=0.0051, lr_scaling="none", knn_every=0))),
    "smoke": dict(data={"cifar10": SMOKE}, common=dict(init="kaiming_uniform", weight_decay=5e-4, momentum=0.9),
                  batches=(512,), lrs={512: (1, 2)}, epochs=2,
                  ssl=dict(batches=(512,), lrs={512: (1,)}, epochs=2, linear=2,
                           cfg=dict(projector="32-32", lambd=0.0051, lr_scaling="none", knn_every=0))),
}


def recipe(opt: str, epochs: int, batch: int, lr: float, n_train: int, paper_train: int, problem: str = "clf",
           lam: float | None = None) -> dict:
    """Table 1's optimizer settings (App. A, ``PAPER_SETTINGS``) for a run of ``epochs`` over ``n_train`` images at
    ``batch``, the warm-up, delay and ``lam`` mapped from the paper's run (``paper_train`` images, 100 epochs; Barlow
    Twins 1000); ``lars-nowarmup``: Fig. 1-2's LARS without warm-up (polynomial decay)."""
    pe = PAPER_EPOCHS[problem]
    gmin = scaling.gamma_min(batch)
    warm = dict(schedule="cosine", warmup_epochs=scaling.warmup_epochs(20, pe, epochs), min_lr_ratio=gmin / lr)
    if opt == "tvlars":
        lam = PAPER_SETTINGS["tvlars_lam"][0][problem] if lam is None else lam
        return dict(optimizer="tvlars", schedule="none", epochs=epochs, tvlars_gamma_min=gmin,
                    tvlars_lam=scaling.map_lam(lam, scaling.steps(paper_train, batch, pe), scaling.steps(n_train, batch, epochs)),
                    tvlars_delay_epochs=scaling.warmup_epochs(10, pe, epochs))
    if opt == "lars-nowarmup":
        return dict(optimizer="lars", schedule="poly", epochs=epochs, min_lr_ratio=gmin / lr)
    return dict(optimizer=opt, epochs=epochs, **warm)


def mapping(ctx: Ctx, column: str, batch: int, epochs: int, problem: str = "clf") -> str:
    """The mapping of the time knobs from the paper's run to this one, as printed with the run's settings."""
    s = SCALE[ctx.scale]
    data = s["data"][column]
    lam = PAPER_SETTINGS["tvlars_lam"][0][problem]
    return scaling.describe_mapping(batch, N_TRAIN[data["dataset"]], epochs, lam=lam, delay_epochs=10, warmup=20,
                                    paper_epochs=PAPER_EPOCHS[problem], paper_train=N_TRAIN[column])


def cell(ctx: Ctx, column: str, opt: str, batch: int, lr: float, **extra) -> list[Run]:
    """The seeded runs of one classification cell; a cell of this scale's Table 1 grid (no ``extra``
    settings) lives in ``tvlars-table1``'s folder, shared by every artifact that needs it. ``tvlars_lam`` in
    ``extra`` is the paper-length value (mapped to this run like the default). Run names start with the
    dataset the run trains on (``fashion-mnist-...`` at mini), not the paper column it stands for."""
    s = SCALE[ctx.scale]
    data = s["data"][column]
    lam = extra.pop("tvlars_lam", None)
    cfg = {**data, **s["common"], **recipe(opt, s["epochs"], batch, float(lr), N_TRAIN[data["dataset"]], N_TRAIN[column],
                                           lam=lam), "lr": float(lr), "batch_size": batch, **extra}
    if lam is not None:
        extra = {"tvlars_lam": lam, **extra}
    name = f"{data['dataset']}-{opt}-b{batch}-lr{lr:g}" + "".join(f"-{k.replace('tvlars_', '')}{v}" for k, v in extra.items())
    shared = not extra and opt in OPTIMIZERS + tuple(VARIANTS) and batch in s["batches"] and lr in s["lrs"][batch]
    runs = seeded(ctx, name, cfg, problem="clf", column=column, optimizer=opt, batch=batch, lr=lr, **extra)
    for r in runs:
        r.home = "tvlars-table1" if shared else None
    return runs


def middle(lrs: tuple) -> float:
    return lrs[len(lrs) // 2]


def acc(results: list[E.Result], **tags) -> list[float]:
    """Final test accuracy % of the runs with these tags, a diverged run at chance (one value per seed)."""
    return outcomes(E.where(results, **tags))


def _mid(ctx: Ctx, b: int) -> float:
    lrs = SCALE[ctx.scale]["lrs"].get(b, LRS[b])
    m = middle(LRS[b])
    return m if m in lrs else lrs[0]


# ----------------------------------------------------------------------------- Table 1
def table1_grid(ctx: Ctx) -> list[Run]:
    s = SCALE[ctx.scale]
    opts = OPTIMIZERS + tuple(VARIANTS)
    runs = [r for col in s["data"] for b in s["batches"] for opt in opts for lr in s["lrs"][b]
            for r in cell(ctx, col, opt, b, lr)]
    ssl = s["ssl"]
    for col, data in s["data"].items():
        for b in ssl["batches"]:
            for opt in OPTIMIZERS:
                for lr in ssl["lrs"][b]:
                    cfg = {**data, **s["common"], **recipe(opt, ssl["epochs"], b, float(lr), N_TRAIN[data["dataset"]],
                                                           N_TRAIN[col], problem="ssl"),
                           **ssl["cfg"], "lr": float(lr), "batch_size": b}
                    for r in seeded(ctx, f"bt-{data['dataset']}-{opt}-b{b}-lr{lr:g}", cfg, kind="pretrain", problem="ssl",
                                    column=col, optimizer=opt, batch=b, lr=lr):
                        r.linear_epochs = ssl["linear"]
                        runs.append(r)
        if ssl["batches"]:  # what pre-training must beat: the same backbone at initialization
            cfg = {**data, **s["common"], **ssl["cfg"], "optimizer": "lars", "batch_size": ssl["batches"][0],
                   "epochs": ssl["epochs"], "linear_epochs": ssl["linear"]}
            runs += [Run(f"bt-{data['dataset']}-random-init-s{x}", {"cfg": {**cfg, "seed": x}},
                         dict(problem="ssl-baseline", column=col, seed=x), kind="call", call=random_init_baseline)
                     for x in ctx.seeds]
    return runs


def random_init_baseline(out_dir: str, cfg: dict) -> dict:
    """Linear evaluation of the randomly initialized backbone of a pre-training configuration."""
    import os

    from largebatch.train.config import resolve, save
    from largebatch.train.linear_eval import linear_eval
    from largebatch.train.pretrain import PretrainConfig

    cfg = dict(cfg)
    epochs = cfg.pop("linear_epochs")
    save(resolve(overrides={**cfg, "out_dir": out_dir}, cls=PretrainConfig), os.path.join(out_dir, "config.yaml"))
    r = linear_eval(out_dir, "random-init", epochs=epochs, log=lambda s: None)
    return {"top1": r["top1"], "linear_epochs": epochs}


def table1_collect(ctx: Ctx, results: list[E.Result]) -> str:
    s = SCALE[ctx.scale]
    out = []
    what = {"clf": "classification, final test accuracy %", "ssl": "Barlow Twins, linear-evaluation top-1 %"}
    for problem in ("clf", "ssl"):
        batches = s["batches"] if problem == "clf" else s["ssl"]["batches"]
        lrs = s["lrs"] if problem == "clf" else s["ssl"]["lrs"]
        metric = E.test_acc if problem == "clf" else E.linear_top1
        for col in s["data"]:
            rows = []
            for b in batches:
                for opt in OPTIMIZERS + (tuple(VARIANTS) if problem == "clf" else ()):
                    rs = E.where(results, problem=problem, column=col, batch=b, optimizer=opt)
                    paper = PAPER[problem][col][VARIANTS.get(opt, opt)][b]
                    rows.append([b, opt] + [f"{E.cell(E.where(rs, lr=lr), metric)} ({E.paper(paper[LRS[b].index(lr)])})"
                                            for lr in lrs[b]])
            n = max(len(lrs[b]) for b in batches)
            out += [f"### {what[problem]}: measured (paper Table 1, {col})", "",
                    E.table(["batch", "optimizer"] + [f"lr {i + 1}" for i in range(n)], rows), ""]
            if problem == "ssl" and E.where(results, problem="ssl-baseline", column=col):
                base = E.cell(E.where(results, problem="ssl-baseline", column=col), E.linear_top1)
                out += [f"Random-init backbone, same linear evaluation (baseline pre-training must beat): {base}", ""]
    claims, samples = [], {}
    for col in s["data"]:
        for b in s["batches"]:
            lr, c = _fixed_lr(ctx, "clf", b), f"{col}, B = {b}"
            claims.append(V.Claim(f"tvlars-vs-lars-b{b}", "TVLARS (no warm-up) matches or beats LARS + warm-up (Table 1)",
                                  "tvlars", "lars", "noninferior", 1.0, cell=f"{c}, lr {lr:g}"))
            samples[f"{c}, lr {lr:g}"] = {o: acc(results, problem="clf", column=col, batch=b, optimizer=o, lr=lr)
                                         for o in OPTIMIZERS + tuple(VARIANTS)}
        if 16384 in s["batches"] and set(s["lrs"][16384]) >= {15, 19}:
            for lamb in ("lamb", "lamb-pto"):  # ours and the one the paper ran (pytorch-optimizer's)
                c = f"{col}, B = 16384, {lamb}"
                claims.append(V.Claim(f"{lamb}-low-lr-collapses", f"{lamb} at B = 16K: lr 15 far below lr 19 (Table 1: "
                                      "14.8 vs 77.2)", "lr 15", "lr 19", "less", 5.0, cell=c, needs_control=False))
                samples[c] = {f"lr {lr}": acc(results, problem="clf", column=col, batch=16384, optimizer=lamb, lr=lr)
                              for lr in (15, 19)}
        for b in s["ssl"]["batches"]:
            lr, c = _fixed_lr(ctx, "ssl", b), f"Barlow Twins {col}, B = {b}"
            claims.append(V.Claim(f"bt-tvlars-vs-lars-b{b}", "Barlow Twins: TVLARS beats LARS + warm-up (Table 1)",
                                  "tvlars", "lars", "greater", 1.0, cell=f"{c}, lr {lr:g}"))
            samples[f"{c}, lr {lr:g}"] = {o: E.values(E.where(results, problem="ssl", column=col, batch=b, optimizer=o, lr=lr),
                                                     E.linear_top1) for o in OPTIMIZERS}
    col0 = next(iter(s["data"]))
    out += [verdict_section(ctx, claims, samples),
            "Time knobs of this scale: " + " ".join(mapping(ctx, col0, b, s["epochs"]) for b in s["batches"]), "",
            f"LR columns are Table 1's target LRs per batch: {', '.join(f'{b}: {LRS[b]}' for b in s['batches'])}. "
            f"`lamb-pto` / `lars-flash`: the LAMB and LARS the papers ran (their paper column: LAMB's / LARS's).", "",
            "### TVLARS minus LARS + warm-up at the LR fixed in advance", "",
            "Each cell at Table 1's middle LR of its batch (Barlow Twins: its one LR), chosen before any result, "
            "as the verdicts above are; no LR is picked on the test set. Paper: the same LR's cells of Table 1.", "",
            _effect_table(ctx, results), "", E.save(ctx, _table1_figure(ctx, results), "table1.png")]
    return "\n".join(out)


def _fixed_lr(ctx: Ctx, problem: str, b: int) -> float:
    """The LR a batch's cell is read at, fixed before any result: Table 1's middle LR
    (classification), the one LR of the Barlow Twins cell. Never the best on the test set."""
    return _mid(ctx, b) if problem == "clf" else SCALE[ctx.scale]["ssl"]["lrs"][b][0]


def _mean_at(results: list[E.Result], metric, lr: float) -> float | None:
    v = E.values(E.where(results, lr=lr), metric)
    return E.mean_std(v)[0] if v else None


def _effect_table(ctx: Ctx, results: list[E.Result]) -> str:
    s, rows = SCALE[ctx.scale], []
    for problem, metric, batches in (("clf", E.test_acc, s["batches"]), ("ssl", E.linear_top1, s["ssl"]["batches"])):
        for col in s["data"]:
            for b in batches:
                lr = _fixed_lr(ctx, problem, b)
                got = {o: _mean_at(E.where(results, problem=problem, column=col, batch=b, optimizer=o), metric, lr)
                       for o in ("tvlars", "lars")}
                pap = {o: PAPER[problem][col][o][b][LRS[b].index(lr)] for o in ("tvlars", "lars")}
                diff = "-" if None in got.values() else f"{got['tvlars'] - got['lars']:+.2f}"
                rows.append([problem, col, b, f"{lr:g}", diff, f"{pap['tvlars'] - pap['lars']:+.2f}"])
    return E.table(["problem", "paper column", "batch", "lr", "measured", "paper"], rows)


def _table1_figure(ctx: Ctx, results: list[E.Result]):
    from largebatch.plotting import pyplot

    s = SCALE[ctx.scale]
    panels = [(p, c) for p in ("clf", "ssl") for c in s["data"]]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (problem, col) in zip(axes[0], panels):
        batches = s["batches"] if problem == "clf" else s["ssl"]["batches"]
        metric = E.test_acc if problem == "clf" else E.linear_top1
        for i, opt in enumerate(OPTIMIZERS):
            got = [_mean_at(E.where(results, problem=problem, column=col, batch=b, optimizer=opt), metric,
                            _fixed_lr(ctx, problem, b)) for b in batches]
            ax.plot(batches, [math.nan if g is None else g for g in got], "o-", color=f"C{i}", label=f"{opt} (measured)")
            pap = [PAPER[problem][col][opt][b][LRS[b].index(_fixed_lr(ctx, problem, b))] for b in batches]
            ax.plot(batches, pap, "s--", color=f"C{i}", alpha=0.5,
                    label=f"{opt} (paper)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_ylabel("accuracy % at Table 1's middle LR")
        what = "classification" if problem == "clf" else "Barlow Twins"
        ax.set_title(f"{what}: {col}{'' if ctx.scale == 'paper' else ' (stand-in)'}")
        ax.grid(alpha=0.3)
    E.legend(axes[0][0], fontsize=7)
    return fig


TABLE1 = Artifact(
    "tvlars-table1", "TVLARS Table 1: LARS, LAMB and TVLARS, classification and Barlow Twins, B = 512 ... 16K",
    "Does TVLARS (no warm-up) match or beat LARS and LAMB with warm-up at every batch size, by 1-7 points in "
    "classification and more in Barlow Twins; does LAMB collapse at the lower LRs of large batches?",
    {"paper": "CIFAR-10 / ResNet-18 and Tiny ImageNet / ResNet-34 (ImageNet stem, synchronized BN), B = 512 ... 16384 x "
              "Table 1's three target LRs x LARS, LAMB (warm-up 20 epochs + cosine to gamma_min), TVLARS (lam 1e-4, "
              "delay 10 epochs, gamma_min B/512 x 0.001), and the papers' LAMB / LARS (lamb-pto, lars-flash); 100 "
              "epochs (not stated); Barlow Twins (LARS, LAMB, TVLARS): 1000 pre-training epochs (warm-up 20, TVLARS "
              "lam 1e-5 and delay 10; projector 2048-2048-4096) + 100-epoch linear evaluation. 288 runs.",
     "mini": f"{MINI_NOTE}; B = 1024, 4096, 16384 with Table 1's LRs, the five optimizers, 12 epochs (warm-up 2.4, "
             "TVLARS delay 1.2 and lam x steps as the paper's): 45 cells. Barlow Twins at B = 4096, LR 9 only: 5 "
             "pre-training epochs (warm-up and delay 2% and 1% of the run), projector 512-512, 30-epoch linear "
             "evaluation, next to the random-init backbone. Paper column: CIFAR-10.",
     "smoke": "plumbing only: digits, a tiny BN-MLP, B = 512, two LRs, 2 epochs; one Barlow Twins cell per optimizer"},
    table1_grid, table1_collect)


# ----------------------------------------------------------------------------- Fig. 1 and Fig. 2
FIG1 = {"paper": dict(batches=tuple(LRS)), "mini": dict(batches=(1024, 4096, 16384)), "smoke": dict(batches=(512,))}


def fig1_grid(ctx: Ctx) -> list[Run]:
    s = SCALE[ctx.scale]
    col = next(iter(s["data"]))
    return [r for b in FIG1[ctx.scale]["batches"] for opt in ("lars", "lars-nowarmup")
            for r in cell(ctx, col, opt, b, middle(LRS[b]))]


def fig1_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    batches = FIG1[ctx.scale]["batches"]
    rows = []
    for b in batches:
        wa, nowa = E.where(results, batch=b, optimizer="lars"), E.where(results, batch=b, optimizer="lars-nowarmup")
        a, n = E.values(wa, E.test_acc), E.values(nowa, E.test_acc)
        diff = f"{E.mean_std(a)[0] - E.mean_std(n)[0]:+.2f}" if a and n else "-"
        rows.append([b, middle(LRS[b]), E.cell(wa, E.test_acc), E.cell(nowa, E.test_acc), diff,
                     E.cell(wa, E.best_test_acc), E.cell(nowa, E.best_test_acc)])
    fig, axes = pyplot().subplots(1, len(batches), figsize=(4.2 * len(batches), 3.4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        E.plot_curve(ax, E.where(results, batch=b, optimizer="lars"), "test_acc", "LARS + warm-up", 100)
        E.plot_curve(ax, E.where(results, batch=b, optimizer="lars-nowarmup"), "test_acc", "LARS, no warm-up", 100)
        ax.set_title(f"B = {b}, lr {middle(LRS[b])}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    E.legend(axes[0][0], fontsize=8)
    return "\n".join([
        "Final and best test accuracy %, LARS with warm-up (20% of the run, then cosine) vs without (polynomial "
        "decay), the middle LR of Table 1's set. Paper (Fig. 1, figure only): without warm-up, training is less "
        "stable and ends about 3-5 points lower at large batches.", "",
        E.table(["batch", "lr", "warm-up: final", "no warm-up: final", "difference", "warm-up: best", "no warm-up: best"], rows),
        "", verdict_section(ctx, *fig1_claims(ctx, results)), E.save(ctx, fig, "fig1.png")])


def fig1_claims(ctx: Ctx, results: list[E.Result]) -> tuple[list[V.Claim], dict]:
    """Fig. 1: without warm-up LARS ends 3-5 points lower at large batches (B >= 4096 here)."""
    claims, samples = [], {}
    for b in FIG1[ctx.scale]["batches"]:
        if b < 4096 and ctx.scale != "smoke":
            continue
        c = f"B = {b}, lr {middle(LRS[b])}"
        claims.append(V.Claim(f"warmup-matters-b{b}", "LARS + warm-up ends at least 3 points above LARS without (Fig. 1)",
                              "lars", "lars-nowarmup", "greater", 3.0, cell=c, control=True))  # itself a control
        samples[c] = {o: acc(results, batch=b, optimizer=o) for o in ("lars", "lars-nowarmup")}
    return claims, samples


FIG1_ART = Artifact(
    "tvlars-fig1", "TVLARS Fig. 1: LARS with and without warm-up, test accuracy vs epoch per batch size",
    "Without warm-up, is LARS less stable and 3-5 points worse, increasingly so as the batch grows?",
    {"paper": "CIFAR-10 / ResNet-18, B = 512 ... 16384 at the middle LR of Table 1's set, 100 epochs; the warm-up "
              "runs are Table 1's cells",
     "mini": f"{MINI_NOTE}; B = 1024, 4096, 16384, 12 epochs (the warm-up runs are tvlars-table1's mini cells)",
     "smoke": "plumbing only: digits, tiny BN-MLP, B = 512, 2 epochs"},
    fig1_grid, fig1_collect)

FIG2 = {"paper": dict(batch=16384, epochs=100), "mini": dict(batch=16384, epochs=30), "smoke": dict(batch=512, epochs=2)}


def fig2_grid(ctx: Ctx) -> list[Run]:
    s, f = SCALE[ctx.scale], FIG2[ctx.scale]
    col, lr = next(iter(s["data"])), middle(LRS[f["batch"]])
    runs = []
    for opt in ("lars", "lars-nowarmup"):
        data = s["data"][col]
        cfg = {**data, **s["common"], **recipe(opt, f["epochs"], f["batch"], float(lr), N_TRAIN[data["dataset"]], N_TRAIN[col]),
               "lr": float(lr), "batch_size": f["batch"], "stats_every": 1}
        runs += seeded(ctx, f"{data['dataset']}-{opt}-b{f['batch']}-lr{lr:g}-e{f['epochs']}", cfg, optimizer=opt)
    return runs


def _layer_stats(res: E.Result) -> list[dict]:
    import os

    from largebatch.train.rundir import read_table

    for ext in (".csv", ".jsonl"):
        p = os.path.join(res.path, "layer_stats" + ext)
        if os.path.exists(p):
            return [r for r in read_table(p) if str(r["adapt"]) in ("1", "True", "true")]
    return []


def _lnr_summary(res: E.Result) -> tuple[float, float, float]:
    """Median LNR over layers: at the first recorded step, its maximum, at the last step."""
    rows = _layer_stats(res)
    by_step: dict[int, list[float]] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(float(r["lnr"]))
    med = [sorted(v)[len(v) // 2] for _, v in sorted(by_step.items())]
    return (med[0], max(med), med[-1]) if med else (math.nan,) * 3


def fig2_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    rows = []
    for opt, label in (("lars", "with warm-up"), ("lars-nowarmup", "without warm-up")):
        rs = E.where(results, optimizer=opt)
        rows.append([label, E.cell(rs, E.test_acc), E.cell(rs, lambda r: r.final["test_loss"], 3)]
                    + [E.cell(rs, lambda r, i=i: _lnr_summary(r)[i], 3) for i in range(3)])
    fig, axes = pyplot().subplots(2, 4, figsize=(16, 6.5))
    for row, (opt, label) in zip(axes, (("lars", "WA-LARS"), ("lars-nowarmup", "NOWA-LARS"))):
        rs = [r for r in E.where(results, optimizer=opt) if r.status == "finished"]
        if rs:
            stats, spe = _layer_stats(rs[0]), rs[0].history[0]["step"]
            layers = list(dict.fromkeys(r["layer"] for r in stats))
            for k, (key, title) in enumerate((("w_norm", "||w|| (LWN)"), ("g_norm", "||grad|| (LGN)"),
                                              ("lnr", "||w|| / ||grad|| (LNR)"))):
                for j, layer in enumerate(layers):
                    pts = [(r["step"] / spe, r[key]) for r in stats if r["layer"] == layer]
                    row[k].plot(*zip(*pts), lw=0.8, color=pyplot().cm.viridis(j / max(1, len(layers) - 1)))
                row[k].set_yscale("log")
                row[k].set_title(f"{label}: {title}", fontsize=9)
        E.plot_curve(row[3], E.where(results, optimizer=opt), "test_loss", label)
        row[3].set_title(f"{label}: test loss", fontsize=9)
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    return "\n".join([
        f"LARS at B = {FIG2[ctx.scale]['batch']}, lr {middle(LRS[FIG2[ctx.scale]['batch']])}, with vs without warm-up; "
        "layer statistics every step (adapted layers; the figure: seed 0, one line per layer, darker = nearer the "
        "input). LNR: the median over layers. Paper (Fig. 2, figure only): without warm-up the LNR is higher early "
        "and falls steeply as ||w|| shrinks; warm-up keeps it lower and declining gradually.", "",
        E.table(["LARS", "final test acc %", "final test loss", "LNR first step", "LNR max", "LNR last step"], rows),
        "", E.save(ctx, fig, "fig2.png")])


FIG2_ART = Artifact(
    "tvlars-fig2", "TVLARS Fig. 2: per-layer LWN, LGN, LNR and test loss, LARS with and without warm-up at B = 16K",
    "Without warm-up, is LARS's layer-wise ratio ||w||/||g|| high early and then falling steeply (weights shrinking), "
    "where warm-up keeps it lower and declining gradually?",
    {"paper": "CIFAR-10 / ResNet-18, B = 16384, lr 17, 100 epochs, layer statistics every step",
     "mini": f"{MINI_NOTE}; B = 16384 (3 steps per epoch), lr 17, 30 epochs, statistics every step",
     "smoke": "plumbing only: digits, tiny BN-MLP, B = 512, 2 epochs"},
    fig2_grid, fig2_collect)


# ----------------------------------------------------------------------------- Fig. 3: phi(t)
PHI_PANELS = (  # (varied parameter, its values, the fixed ones); 10,000 steps. The paper's values are not stated.
    ("lam", (1e-2, 5e-3, 1e-3, 5e-4, 1e-4, 1e-5), dict(alpha=1.0, delay=1000, gamma_min=0.0)),
    ("alpha", (0.5, 1.0, 2.0), dict(lam=1e-3, delay=1000, gamma_min=0.0)),
    ("delay", (0, 1000, 3000), dict(lam=1e-3, alpha=1.0, gamma_min=0.0)),
    ("gamma_min", (0.0, 0.05, 0.2), dict(lam=1e-3, alpha=1.0, delay=1000)),
)
PHI_STEPS = 10_000


def fig3_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot
    from largebatch.schedules import tvlars_phi

    t = list(range(0, PHI_STEPS + 1, 10))
    fig, axes = pyplot().subplots(1, len(PHI_PANELS), figsize=(4.2 * len(PHI_PANELS), 3.4))
    rows = []
    for ax, (name, vals, fixed) in zip(axes, PHI_PANELS):
        for v in vals:
            p = {**fixed, name: v}
            phi = [tvlars_phi(x, **p) for x in t]
            ax.plot(t, phi, label=f"{name} = {v:g}")
            upper = 1 / (p["alpha"] + math.exp(-p["lam"] * p["delay"])) + p["gamma_min"]
            ok = all(p["gamma_min"] - 1e-12 <= y <= upper + 1e-12 for y in phi) and all(
                b <= a + 1e-15 for a, b in zip(phi, phi[1:]))
            rows.append([", ".join(f"{k} {p[k]:g}" for k in ("lam", "alpha", "delay", "gamma_min")),
                         f"{phi[0]:.4f}", f"{tvlars_phi(p['delay'], **p):.4f}", f"{phi[-1]:.4f}",
                         f"[{p['gamma_min']:g}, {upper:.4f}]", "yes" if ok else "NO"])
        ax.set_title(f"phi(t), varying {name}")
        ax.set_xlabel("step t")
        ax.grid(alpha=0.3)
        E.legend(ax, fontsize=7)
    axes[0].set_ylabel("phi(t)")
    return "\n".join([
        f"TVLARS's time-varying factor (eq. 8) over {PHI_STEPS} steps; the parameters of the paper's figure are not "
        "stated, these span the values its experiments use. Bounds: eq. 9 (upper = phi(0)); 'holds' also checks "
        "that phi is non-increasing.", "",
        E.table(["parameters", "phi(0)", "phi(delay)", f"phi({PHI_STEPS})", "bounds (eq. 9)", "holds"], rows), "",
        E.save(ctx, fig, "fig3.png")])


FIG3_ART = Artifact(
    "tvlars-fig3", "TVLARS Fig. 3 (000 Fig. 5): the decay factor phi(t) for several lam, alpha, delay, gamma_min",
    "Is phi a smooth, non-increasing sigmoid decay inside the eq. 9 bounds, steeper for larger lam?",
    {scale: "no training: eq. 8 evaluated on 10,000 steps (the same at every scale)" for scale in ("paper", "mini", "smoke")},
    lambda ctx: [], fig3_collect, seeds={"paper": 0, "mini": 0, "smoke": 0})


# ----------------------------------------------------------------------------- ablations
ABL = {  # batch sizes and LR choice per scale ("all": Table 1's three LRs, "middle": one)
    "lambda": {"paper": dict(batches=(1024, 16384), lrs="all"), "mini": dict(batches=(1024, 16384), lrs="middle"),
               "smoke": dict(batches=(512,), lrs="middle")},
    "lr": {"paper": dict(batches=tuple(LRS)), "mini": dict(batches=(1024, 4096, 16384)), "smoke": dict(batches=(512,))},
    "init": {"paper": dict(batches=(8192, 16384), columns=("cifar10", "tinyimagenet")),
             "mini": dict(batches=(8192, 16384), columns=("cifar10",)), "smoke": dict(batches=(512,), columns=("cifar10",))},
}


def _lrs(b: int, which: str) -> tuple:
    return LRS[b] if which == "all" else (middle(LRS[b]),)


def lambda_grid(ctx: Ctx) -> list[Run]:
    a, col = ABL["lambda"][ctx.scale], next(iter(SCALE[ctx.scale]["data"]))
    lams = LAMBDAS if ctx.scale != "smoke" else (1e-2, 1e-4)
    return [r for b in a["batches"] for lr in _lrs(b, a["lrs"]) for lam in lams
            for r in (cell(ctx, col, "tvlars", b, lr) if lam == 1e-4 else cell(ctx, col, "tvlars", b, lr, tvlars_lam=lam))]


def _lam(r: E.Result) -> float:
    return r.run.tags.get("tvlars_lam", 1e-4)


def lambda_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    a = ABL["lambda"][ctx.scale]
    lams = sorted({_lam(r) for r in results}, reverse=True)
    cols = [(b, lr) for b in a["batches"] for lr in _lrs(b, a["lrs"])]
    rows = [[f"{lam:g}"] + [E.cell([r for r in E.where(results, batch=b, lr=lr) if _lam(r) == lam], E.test_acc)
                            for b, lr in cols] for lam in lams]
    fig, axes = pyplot().subplots(len(a["batches"]), 2, figsize=(10, 3.4 * len(a["batches"])), squeeze=False)
    for row, b in zip(axes, a["batches"]):
        lr = middle(LRS[b])
        for lam in lams:
            rs = [r for r in E.where(results, batch=b, lr=lr) if _lam(r) == lam]
            E.plot_curve(row[0], rs, "test_acc", f"lam {lam:g}", 100)
            E.plot_curve(row[1], rs, "test_loss", f"lam {lam:g}")
        row[0].set_title(f"B = {b}, lr {lr}: test accuracy %")
        row[1].set_title(f"B = {b}, lr {lr}: test loss")
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    E.legend(axes[0][0], fontsize=7)
    return "\n".join([
        "TVLARS final test accuracy % per decay coefficient lam (the paper's value per optimizer step; a shorter run "
        "uses it scaled so that lam x total steps is the paper's; delay = 10% of the run, alpha = 1). "
        "Paper (001 Fig. 4, figure only): at B = 1K small lam is best (about 84% at lam 1e-5 on CIFAR-10); at B = 16K "
        "the large lam (0.01, 0.005, 0.001) are best.", "",
        E.table(["lam"] + [f"B {b}, lr {lr}" for b, lr in cols], rows), "", verdict_section(ctx, *lambda_claims(ctx, results)),
        "Time knobs: " + " ".join(mapping(ctx, next(iter(SCALE[ctx.scale]["data"])), b, SCALE[ctx.scale]["epochs"])
                                  for b in a["batches"]), "", E.save(ctx, fig, "ablation_lambda.png")])


def lambda_claims(ctx: Ctx, results: list[E.Result]) -> tuple[list[V.Claim], dict]:
    """001 Fig. 4: at B = 1K a small lam (1e-5) beats a large one (0.01); at B = 16K the large one wins."""
    a, claims, samples = ABL["lambda"][ctx.scale], [], {}
    lams = sorted({_lam(r) for r in results})
    if len(lams) < 2:
        return claims, samples
    small, large = lams[0] if 1e-5 not in lams else 1e-5, lams[-1]
    for b in a["batches"]:
        lr = _mid(ctx, b)
        c = f"B = {b}, lr {lr:g}"
        samples[c] = {f"lam {lam:g}": [v for r in E.where(results, batch=b, lr=lr) if _lam(r) == lam
                                       for v in outcomes([r])] for lam in (small, large)}
        win, lose = (small, large) if b <= 1024 else (large, small)
        claims.append(V.Claim(f"lam-b{b}", f"{'small' if win == small else 'large'} lam best at B = {b} (Fig. 4)",
                              f"lam {win:g}", f"lam {lose:g}", "greater", 0.5, cell=c, needs_control=False))
    return claims, samples


LAMBDA_ART = Artifact(
    "tvlars-ablation-lambda", "TVLARS Fig. 4 (000 Fig. 6): the decay coefficient lam at B = 1K and 16K",
    "Is a small lam (slow decay) best at B = 1K and a large lam (fast decay) best at B = 16K?",
    {"paper": "CIFAR-10 / ResNet-18, lam in {0.01, 0.005, 0.001, 1e-4, 1e-5, 1e-6}, B = 1024 and 16384 with Table 1's "
              "LRs, delay 10 epochs, alpha 1, 100 epochs (the lam = 1e-4 runs are Table 1's cells)",
     "mini": f"{MINI_NOTE}; the six lam (each mapped so that lam x total steps is the paper's), B = 1024 (lr 3) and "
             "16384 (lr 17), 12 epochs, delay 1.2 epochs (lam 1e-4: tvlars-table1's mini cells)",
     "smoke": "plumbing only: digits, tiny BN-MLP, lam 0.01 and 1e-4, 2 epochs"},
    lambda_grid, lambda_collect)


def lr_grid(ctx: Ctx) -> list[Run]:
    col = next(iter(SCALE[ctx.scale]["data"]))
    lrs = SCALE[ctx.scale]["lrs"]
    return [r for b in ABL["lr"][ctx.scale]["batches"] for lr in lrs.get(b, LRS[b]) for r in cell(ctx, col, "tvlars", b, lr)]


def lr_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    batches = ABL["lr"][ctx.scale]["batches"]
    lrs = SCALE[ctx.scale]["lrs"]
    rows = [[b] + [f"{lr}: {E.cell(E.where(results, batch=b, lr=lr), E.test_acc)} "
                   f"({E.paper(PAPER['clf']['cifar10']['tvlars'][b][LRS[b].index(lr)])})" for lr in lrs.get(b, LRS[b])]
            for b in batches]
    fig, axes = pyplot().subplots(2, len(batches), figsize=(4.2 * len(batches), 6.4), squeeze=False)
    for j, b in enumerate(batches):
        for lr in lrs.get(b, LRS[b]):
            E.plot_curve(axes[0][j], E.where(results, batch=b, lr=lr), "test_acc", f"lr {lr}", 100)
            E.plot_curve(axes[1][j], E.where(results, batch=b, lr=lr), "test_loss", f"lr {lr}")
        axes[0][j].set_title(f"B = {b}: test accuracy %")
        axes[1][j].set_title(f"B = {b}: test loss")
        E.legend(axes[0][j], fontsize=7)
        for ax in axes[:, j]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    return "\n".join([
        "TVLARS (lam 1e-4) final test accuracy % per target LR: measured (paper Table 1, CIFAR-10). Paper (001 Fig. 5): "
        "the higher the LR of the set, the lower the loss and the higher the accuracy.", "",
        E.table(["batch"] + [f"lr {i + 1}" for i in range(3)], rows), "", verdict_section(ctx, *lr_claims(ctx, results)),
        E.save(ctx, fig, "ablation_lr.png")])


def lr_claims(ctx: Ctx, results: list[E.Result]) -> tuple[list[V.Claim], dict]:
    """001 Fig. 5: within a batch's LR set, the highest LR gives the highest accuracy."""
    claims, samples = [], {}
    for b in ABL["lr"][ctx.scale]["batches"]:
        lrs = SCALE[ctx.scale]["lrs"].get(b, LRS[b])
        if len(lrs) < 2:
            continue
        c = f"B = {b}"
        samples[c] = {f"lr {lr:g}": acc(results, batch=b, lr=lr) for lr in (lrs[0], lrs[-1])}
        claims.append(V.Claim(f"high-lr-b{b}", "TVLARS: the highest LR of the set beats the lowest (Fig. 5)",
                              f"lr {lrs[-1]:g}", f"lr {lrs[0]:g}", "greater", 0.5, cell=c, needs_control=False))
    return claims, samples


LR_ART = Artifact(
    "tvlars-ablation-lr", "TVLARS Fig. 5 (000 Fig. 7): the target learning rate per batch size (lam = 1e-4)",
    "Within each batch size's LR set, does the highest target LR give the lowest loss and highest accuracy?",
    {"paper": "CIFAR-10 / ResNet-18, TVLARS lam 1e-4, B = 512 ... 16384 x Table 1's LRs: exactly Table 1's TVLARS cells",
     "mini": f"{MINI_NOTE}; B = 1024, 4096, 16384 x Table 1's LRs, 12 epochs: tvlars-table1's TVLARS mini cells",
     "smoke": "plumbing only: digits, tiny BN-MLP, B = 512, 2 epochs"},
    lr_grid, lr_collect)


def init_grid(ctx: Ctx) -> list[Run]:
    a = ABL["init"][ctx.scale]
    inits = INITS if ctx.scale != "smoke" else INITS[:2]
    return [r for col in a["columns"] for b in a["batches"] for opt in ("lars", "tvlars") for init in inits
            for r in (cell(ctx, col, opt, b, middle(LRS[b])) if init == "kaiming_uniform"
                      else cell(ctx, col, opt, b, middle(LRS[b]), init=init))]


def init_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    a = ABL["init"][ctx.scale]
    inits = sorted({r.run.tags.get("init", "kaiming_uniform") for r in results}, key=INITS.index)

    def pick(col, b, opt, init):
        return [r for r in E.where(results, column=col, batch=b, optimizer=opt)
                if r.run.tags.get("init", "kaiming_uniform") == init]

    rows = [[col, b, init] + [E.cell(pick(col, b, o, init), E.test_acc) for o in ("lars", "tvlars")]
            for col in a["columns"] for b in a["batches"] for init in inits]
    panels = [(c, b) for c in a["columns"] for b in a["batches"]]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (col, b) in zip(axes[0], panels):
        for i, init in enumerate(inits):
            for opt, ls in (("lars", "--"), ("tvlars", "-")):
                E.plot_curve(ax, pick(col, b, opt, init), "test_acc", f"{opt}, {init}", 100, color=f"C{i}", ls=ls)
        ax.set_title(f"{col}{'' if ctx.scale == 'paper' else ' (stand-in)'}, B = {b}, lr {middle(LRS[b])}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    E.legend(axes[0][0], fontsize=6)
    return "\n".join([
        "Final test accuracy % per weight initialization, LARS + warm-up vs TVLARS (lam 1e-4), the middle LR of "
        "Table 1's set. Paper (000 Fig. 8, figure only): results nearly unchanged across initializations; TVLARS "
        "1-3 points above LARS.", "",
        E.table(["data", "batch", "init", "LARS + warm-up", "TVLARS"], rows), "", verdict_section(ctx, *init_claims(ctx, results)),
        E.save(ctx, fig, "ablation_init.png")])


def init_claims(ctx: Ctx, results: list[E.Result]) -> tuple[list[V.Claim], dict]:
    """000 Fig. 8: TVLARS 1-3 points above LARS + warm-up under every init; LARS nearly unchanged across inits."""
    a, claims, samples = ABL["init"][ctx.scale], [], {}
    inits = sorted({r.run.tags.get("init", "kaiming_uniform") for r in results}, key=INITS.index)
    for col in a["columns"]:
        b = a["batches"][-1]
        for init in inits:
            c = f"{col}, B = {b}, {init}"
            samples[c] = {o: [v for r in E.where(results, column=col, batch=b, optimizer=o)
                              if r.run.tags.get("init", "kaiming_uniform") == init for v in outcomes([r])]
                          for o in ("lars", "tvlars")}
            claims.append(V.Claim(f"tvlars-ahead-{init}", "TVLARS at least 1 point above LARS + warm-up (Fig. 8)",
                                  "tvlars", "lars", "greater", 1.0, cell=c))
        if len(inits) > 1 and "kaiming_uniform" in inits:
            c = f"{col}, B = {b}, LARS"
            samples[c] = {init: samples[f"{col}, B = {b}, {init}"]["lars"] for init in (inits[0], "kaiming_uniform")}
            if inits[0] != "kaiming_uniform":
                claims.append(V.Claim("lars-init-insensitive", "LARS nearly unchanged across inits (Fig. 8)",
                                      inits[0], "kaiming_uniform", "equivalent", 1.0, cell=c, needs_control=False))
    return claims, samples


INIT_ART = Artifact(
    "tvlars-ablation-init", "TVLARS 000 Fig. 8: weight initialization (Xavier / Kaiming, uniform / normal) at B = 8K, 16K",
    "Are LARS and TVLARS insensitive to the initialization, with TVLARS 1-3 points ahead for each?",
    {"paper": "CIFAR-10 / ResNet-18 and Tiny ImageNet / ResNet-34, B = 8192 (lr 12) and 16384 (lr 17), four inits, "
              "LARS + warm-up and TVLARS, 100 epochs (Kaiming-uniform runs: Table 1's cells)",
     "mini": f"{MINI_NOTE}; B = 8192 (lr 12) and 16384 (lr 17), four inits, 12 epochs (B = 16384 Kaiming-uniform: "
             "tvlars-table1's mini cells)",
     "smoke": "plumbing only: digits, tiny BN-MLP, two inits, 2 epochs"},
    init_grid, init_collect)

ARTIFACTS = (TABLE1, FIG1_ART, FIG2_ART, FIG3_ART, LAMBDA_ART, LR_ART, INIT_ART)
