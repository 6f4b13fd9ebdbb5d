"""CLARS (Huo, Gu, Huang 2021; seed 004): Figs. 1-3 and Table 1.

mNAG (the paper's Nesterov momentum) is ``sgd`` with ``nesterov: true``. Models the harness does not
have (VGG-11 with BN, DenseNet-121, MobileNetV2) are left out at paper scale and said so; ResNet-8 and
the sigmoid FCN / CNN of Fig. 2 are built by this module's task.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from largebatch.train.loop import Classification

from .. import engine as E
from .. import verdicts as V
from ..engine import Artifact, Ctx, Run
from .common import MINI, MINI_NOTE, SMOKE, make_tiny_imagenet, outcomes, seeded, verdict_section

MNAG = dict(optimizer="sgd", nesterov=True, momentum=0.9)


# ----------------------------------------------------------------------------- Fig. 1
FIG1 = {
    "paper": dict(data=dict(dataset="cifar10", model="resnet56"), batches=(128, 256, 512, 1024, 2048, 4096, 8192),
                  epochs=100, warmup=5.0),
    "mini": dict(data=MINI, batches=(128, 512, 2048, 8192), epochs=15, warmup=0.75),
    "smoke": dict(data=SMOKE, batches=(128, 512), epochs=2, warmup=0.5),
}


def fig1_grid(ctx: Ctx) -> list[Run]:
    s = FIG1[ctx.scale]
    common = dict(lr=0.1, lr_scaling="linear", base_batch_size=128, weight_decay=5e-4, schedule="poly",
                  warmup_epochs=s["warmup"], epochs=s["epochs"])
    opts = {"mNAG": MNAG, "LARS": dict(optimizer="lars", eta=0.001, momentum=0.9)}
    return [r for b in s["batches"] for name, o in opts.items()
            for r in seeded(ctx, f"{name.lower()}-b{b}", {**s["data"], **common, **o, "batch_size": b}, method=name, batch=b)]


def _steps(res: E.Result) -> list[dict]:
    from largebatch.train.rundir import read_table

    for ext in (".csv", ".jsonl"):
        if os.path.exists(p := os.path.join(res.path, "steps" + ext)):
            return read_table(p)
    return []


def fig1_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    s = FIG1[ctx.scale]
    rows = [[b] + [E.cell(E.where(results, method=m, batch=b), fn, d) for m in ("mNAG", "LARS")
                   for fn, d in ((lambda r: r.final["train_loss"], 3), (E.test_acc, 2))] for b in s["batches"]]
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    cmap = pyplot().cm.viridis
    for i, b in enumerate(s["batches"]):
        c = cmap(i / max(1, len(s["batches"]) - 1))
        for m, ls in (("mNAG", "--"), ("LARS", "-")):
            E.plot_curve(axes[0], E.where(results, method=m, batch=b), "train_loss", f"{m} B={b}", color=c, ls=ls)
            E.plot_curve(axes[1], E.where(results, method=m, batch=b), "test_acc", f"{m} B={b}", 100, color=c, ls=ls)
    axes[0].set_yscale("log")
    mid = 2048 if 2048 in s["batches"] else s["batches"][-1]
    done = [r for r in E.where(results, method="LARS", batch=mid) if r.status == "finished"]
    if done and (st := _steps(done[0])):
        spe = done[0].history[0]["step"]
        axes[2].plot([r["step"] / spe for r in st], [r["lr"] for r in st])
    axes[2].set_title(f"gamma_scale (the LR schedule) at B = {mid}")
    for ax, t in zip(axes[:2], ("training loss (solid LARS, dashed mNAG)", "test accuracy %")):
        ax.set_title(t)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    E.legend(axes[1], fontsize=6, ncol=2)
    return "\n".join([
        "Final training loss and test accuracy %, mNAG vs LARS (eta 0.001), LR 0.1 x B/128, warm-up + polynomial "
        "decay. Paper (Fig. 1, figure only): LARS converges much faster than mNAG at B = 8192 (mNAG diverges on VGG-11).",
        "", E.table(["batch", "mNAG train loss", "mNAG test acc", "LARS train loss", "LARS test acc"], rows), "",
        E.save(ctx, fig, "fig1.png")])


FIG1_ART = Artifact(
    "clars-fig1", "CLARS Fig. 1: mNAG vs LARS as the batch grows; gamma_scale at B = 2048",
    "As the batch grows to 8K, does LARS keep converging while mNAG slows down or diverges?",
    {"paper": "CIFAR-10 / ResNet-56 (VGG-11 with BN is not in the harness), B = 128 ... 8192 (powers of 2), LR 0.1 x "
              "B/128, LARS eta 0.001, momentum 0.9, weight decay 5e-4, 5 warm-up epochs + polynomial decay and 100 "
              "epochs (not stated)",
     "mini": f"{MINI_NOTE}; B = 128, 512, 2048, 8192, 15 epochs, warm-up 0.75 epochs",
     "smoke": "plumbing only: digits, tiny BN-MLP, B = 128 and 512, 2 epochs"},
    fig1_grid, fig1_collect)


# ----------------------------------------------------------------------------- Fig. 2: M_k
def build_arch(arch: str, shape: tuple[int, int, int], num_classes: int, width: int = 256) -> nn.Module:
    """Fig. 2's models: ``fcn5`` (5 Linear layers, sigmoid), ``cnn5`` (3 conv + 2 Linear, sigmoid, max-pool)
    and ``resnet8`` (the CIFAR ResNet with one block per stage). Widths are not stated in the paper."""
    c, h, w = shape
    if arch == "fcn5":
        layers: list[nn.Module] = [nn.Flatten()]
        d = c * h * w
        for _ in range(4):
            layers += [nn.Linear(d, width), nn.Sigmoid()]
            d = width
        return nn.Sequential(*layers, nn.Linear(d, num_classes))
    if arch == "cnn5":
        body = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten())
        with torch.no_grad():
            d = body(torch.zeros(1, c, h, w)).shape[1]
        return nn.Sequential(*body, nn.Linear(d, 128), nn.Sigmoid(), nn.Linear(128, num_classes))
    if arch == "resnet8":
        from largebatch.models import CifarResNet

        return CifarResNet(8, num_classes, c)
    raise ValueError(f"arch: {arch!r} is not one of fcn5, cnn5, resnet8")


class VarianceProbe(Classification):
    """Classification of ``arch`` that, after each epoch, measures ``M_k = mean_i ||grad_k f_i||^2 /
    ||mean_i grad_k f_i||^2`` per weight tensor on the first ``probe`` training images (the paper: all of
    them), in eval mode (BatchNorm then uses its running statistics, so per-sample gradients are truly
    per sample), and appends ``{"epoch", "M"}`` to ``OUT_DIR/variance.jsonl``."""

    def __init__(self, arch: str, probe: int):
        self.arch, self.probe = arch, probe

    def build_model(self, cfg, ds) -> nn.Module:
        from largebatch.models import init_weights

        return init_weights(build_arch(self.arch, ds.shape, ds.num_classes), cfg.init)

    def metrics(self, setup, sums, epoch):
        from largebatch.persample import gradient_variance
        from largebatch.train import data as data_mod

        row = super().metrics(setup, sums, epoch)
        model, ds = setup.core, setup.ds
        n = min(self.probe, ds.train_x.shape[0])
        batches = [(data_mod.normalize(ds.train_x[i:i + 512], ds.mean, ds.std), ds.train_y[i:i + 512])
                   for i in range(0, n, 512)]
        was = model.training
        model.eval()
        try:
            m = gradient_variance(model, batches, nn.CrossEntropyLoss(reduction="sum"))
        finally:
            model.train(was)
        if setup.info.is_main:
            weights = {k: v for k, v in m.items() if dict(model.named_parameters())[k].dim() > 1}
            with open(os.path.join(setup.cfg.out_dir, "variance.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "arch": self.arch, "probe": n, "M": weights}) + "\n")
        return row


FIG2 = {  # (panel, data, arch, epochs)
    "paper": dict(panels=(("mnist", "fcn5", 10), ("mnist", "cnn5", 10), ("cifar10", "resnet8", 6)), probe=60000),
    "mini": dict(panels=(("fashion-mnist", "fcn5", 5), ("fashion-mnist", "cnn5", 5), ("fashion-mnist", "resnet8", 3)),
                 probe=4096),
    "smoke": dict(panels=(("digits", "fcn5", 2), ("digits", "cnn5", 2)), probe=256),
}


def fig2_grid(ctx: Ctx) -> list[Run]:
    s, runs = FIG2[ctx.scale], []
    for data, arch, epochs in s["panels"]:
        cfg = dict(dataset=data, model="mlp", **MNAG, lr=0.001, schedule="none", weight_decay=0.0, batch_size=128,
                   epochs=epochs, stats_every=0, augment=False)
        for r in seeded(ctx, f"{arch}-{data}", cfg, arch=arch, data=data):
            r.task = lambda arch=arch: VarianceProbe(arch, s["probe"])
            runs.append(r)
    return runs


def variance_of(res: E.Result) -> dict[int, dict[str, float]]:
    """``{epoch: {layer: M_k}}`` of a run (the last line per epoch: a resumed epoch is measured again)."""
    out: dict[int, dict[str, float]] = {}
    p = os.path.join(res.path, "variance.jsonl")
    if res.status == "finished" and os.path.exists(p):
        with open(p) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[d["epoch"]] = d["M"]
    return out


def fig2_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    s = FIG2[ctx.scale]
    fig, axes = pyplot().subplots(1, len(s["panels"]), figsize=(5 * len(s["panels"]), 3.8), squeeze=False)
    out = []
    for ax, (data, arch, epochs) in zip(axes[0], s["panels"]):
        per_seed = [v for r in E.where(results, arch=arch, data=data) if (v := variance_of(r))]
        if not per_seed:
            out += [f"### {arch} on {data}: no finished run", ""]
            continue
        layers = list(per_seed[0][1])
        eps = sorted(per_seed[0])
        rows = []
        for e in eps:
            rows.append([e] + [E.fmt([v[e][k] for v in per_seed if e in v], ".3g") for k in layers]
                        + [E.fmt([v[e][layers[-1]] / v[e][layers[0]] for v in per_seed if e in v], ".3g")])
        for j, k in enumerate(layers):
            mu = [E.mean_std([v[e][k] for v in per_seed if e in v])[0] for e in eps]
            ax.plot(eps, mu, marker="o", color=pyplot().cm.viridis(j / max(1, len(layers) - 1)), label=k)
        ax.set_yscale("log")
        ax.set_title(f"{arch} on {data}, mNAG lr 0.001, B 128")
        ax.set_xlabel("epoch")
        ax.set_ylabel("M_k")
        ax.grid(alpha=0.3)
        E.legend(ax, fontsize=6, title="bottom (dark) to top (light)", title_fontsize=6)
        out += [f"### {arch} on {data} (seeds: {len(per_seed)})", "",
                E.table(["epoch"] + [f"`{k}`" for k in layers] + ["top / bottom"], rows), ""]
    return "\n".join([
        "Gradient-variance factor M_k per weight tensor after each epoch (mean ± std over seeds), measured on "
        f"{s['probe']} training images in eval mode. Paper (Fig. 2, figure only): top layers have larger M_k than "
        "bottom layers in the first epochs. The last column: M_k of the top layer over the bottom layer's.", ""]
        + out + [E.save(ctx, fig, "fig2.png")])


FIG2_ART = Artifact(
    "clars-fig2", "CLARS Fig. 2: the gradient-variance factor M_k per layer after each epoch",
    "Is M_k larger in the top layers than in the bottom layers during the first epochs?",
    {"paper": "MNIST with a 5-layer sigmoid FCN and CNN (10 epochs), CIFAR-10 with ResNet-8 (6 epochs); mNAG, "
              "constant LR 0.001, B = 128, no weight decay (not stated); M_k over the whole training set",
     "mini": "Fashion-MNIST with the same FCN, CNN (5 epochs) and ResNet-8 (3 epochs); M_k on 4096 training images",
     "smoke": "plumbing only: digits, FCN and CNN, 2 epochs, M_k on 256 images"},
    fig2_grid, fig2_collect)


# ----------------------------------------------------------------------------- Fig. 3: warm-up vs FC freeze vs CLARS
class FreezeHead(Classification):
    """Classification whose last ``nn.Linear`` (the FC layer) gets no update for the first ``epochs``
    (Gotmare et al. 2018): its gradients are dropped, so the optimizer skips it. The step count is the
    LR scheduler's (restored on resume), so the run needs one (a constant LR: cosine, ``min_lr_ratio: 1``)."""

    def __init__(self, epochs: float):
        self.epochs = epochs

    def check(self, cfg) -> None:
        if cfg.schedule == "none":
            raise ValueError("schedule: FC freezing counts steps with the LR scheduler; use schedule cosine with "
                             "min_lr_ratio 1 (a constant LR)")

    def step_gradients(self, setup, idx, gen, sums):
        loss = super().step_gradients(setup, idx, gen, sums)
        if setup.sched.last_epoch < round(self.epochs * setup.spe):
            head = [m for m in setup.core.modules() if isinstance(m, nn.Linear)][-1]
            for p in head.parameters():
                p.grad = None
        return loss


FIG3 = {
    "paper": dict(data=dict(dataset="cifar100", model="resnet56"), batch=8192, epochs=200, trick=20.0),
    "mini": dict(data=MINI, batch=8192, epochs=30, trick=3.0),
    "smoke": dict(data=SMOKE, batch=512, epochs=3, trick=1.0),
}
CONSTANT = dict(schedule="cosine", min_lr_ratio=1.0)  # warm-up (if any), then a constant LR


def fig3_grid(ctx: Ctx) -> list[Run]:
    s = FIG3[ctx.scale]
    base = {**s["data"], "lr": 1.0, "weight_decay": 5e-4, "batch_size": s["batch"], "epochs": s["epochs"]}
    methods = {"warm-up": {**MNAG, **CONSTANT, "warmup_epochs": s["trick"]},
               "FC freeze": {**MNAG, **CONSTANT},
               "CLARS": dict(optimizer="clars", momentum=0.9, schedule="none"),
               "none (control)": {**MNAG, "schedule": "none"}}
    runs = []
    for m, o in methods.items():
        for r in seeded(ctx, m.split()[0].lower().replace("-", ""), {**base, **o}, method=m):
            if m == "FC freeze":
                r.task = lambda t=s["trick"]: FreezeHead(t)
            runs.append(r)
    return runs


def fig3_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    s = FIG3[ctx.scale]
    methods = list(dict.fromkeys(r.run.tags["method"] for r in results))
    rows = [[m, E.cell(E.where(results, method=m), E.test_acc), E.cell(E.where(results, method=m), E.best_test_acc)]
            for m in methods]
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for m in methods:
        E.plot_curve(ax, E.where(results, method=m), "test_acc", m, 100)
    ax.axvline(s["trick"], color="gray", lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"B = {s['batch']}, mNAG LR 1.0 (the tricks act before the dotted line)")
    ax.grid(alpha=0.3)
    E.legend(ax, fontsize=8)
    return "\n".join([
        f"Final and best test accuracy %. Warm-up and FC freezing act for the first {s['trick']:g} epochs, then "
        "the LR stays constant (the caption's setting; the text's step decay at epochs 60/120/150 is not a schedule "
        "the harness has); CLARS (eta 0.01, not stated) runs at the constant LR from the start. 'none' is a control "
        "the paper does not show. Paper (Fig. 3, figure only): CLARS beats both tricks; FC freezing starts well on "
        "VGG-11 but diverges later.", "",
        E.table(["method", "final test acc", "best test acc"], rows), "",
        verdict_section(ctx, FIG3_CLAIMS, {m: outcomes(E.where(results, method=m)) for m in methods}),
        E.save(ctx, fig, "fig3.png")])


FIG3_CLAIMS = (
    V.Claim("clars-vs-warmup", "CLARS (no warm-up) beats mNAG + gradual warm-up (Fig. 3)", "CLARS", "warm-up", "greater", 1.0),
    V.Claim("clars-vs-freeze", "CLARS beats mNAG + FC-layer freezing (Fig. 3)", "CLARS", "FC freeze", "greater", 1.0),
)


FIG3_ART = Artifact(
    "clars-fig3", "CLARS Fig. 3: warm-up vs FC-layer freezing vs CLARS, test accuracy vs epoch",
    "At a large batch and a large constant LR, does CLARS (layer-wise warm-up by construction) beat gradual warm-up "
    "and freezing the FC layer early?",
    {"paper": "CIFAR-100 / ResNet-56 (VGG-11 is not in the harness), B = 8192, mNAG 0.9, LR 1.0, 200 epochs, tricks in "
              "the first 20 epochs, then a constant LR (caption), weight decay 5e-4 (not stated)",
     "mini": f"{MINI_NOTE}; B = 8192, LR 1.0, 30 epochs, tricks in the first 3",
     "smoke": "plumbing only: digits, tiny BN-MLP, B = 512, 3 epochs"},
    fig3_grid, fig3_collect)


# ----------------------------------------------------------------------------- Table 1: ImageNet
#: Table 1, top-1 %: model -> (small batch, LARS, CLARS)
PAPER_T1 = {"ResNet-50": (75.3, 75.1, 75.1), "DenseNet-121": (75.0, 70.4, 73.6), "MobileNetV2": (72.0, 69.6, 70.9)}
TABLE1 = {
    "paper": dict(data=dict(dataset="imagenet", model="resnet50", stem="imagenet"), batch=16384, micro=512, epochs=90,
                  warmup=5.0, small=256, lr=25.0, wd=1e-4),
    "mini": dict(data=MINI, batch=16384, micro=2048, epochs=30, warmup=round(5 / 90 * 30, 3), small=256, lr=25.0, wd=5e-4),
    "smoke": dict(data=dict(SMOKE, dataset="imagenet", mlp_width=8), batch=6, micro=3, epochs=2, warmup=0.5, small=3,
                  lr=25.0, wd=5e-4),
}


def table1_grid(ctx: Ctx) -> list[Run]:
    s = TABLE1[ctx.scale]
    data = dict(s["data"], data_dir=os.path.join(ctx.root, "tiny-imagenet")) if ctx.scale == "smoke" else s["data"]
    big = {**data, "batch_size": s["batch"], "micro_batch_size": s["micro"], "epochs": s["epochs"], "lr": s["lr"],
           "weight_decay": s["wd"], "momentum": 0.9, "schedule": "poly"}
    methods = {"LARS": dict(optimizer="lars", eta=1e-3, warmup_epochs=s["warmup"]),
               "CLARS": dict(optimizer="clars", eta=1e-2),
               "small batch": dict(optimizer="sgd", batch_size=s["small"], micro_batch_size=None, lr=0.1,
                                   schedule="cosine")}
    return [r for m, o in methods.items() for r in seeded(ctx, m.replace(" ", "-").lower(), {**big, **o}, method=m)]


def table1_collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    s = TABLE1[ctx.scale]
    measured = {m: E.cell(E.where(results, method=m), E.test_acc) for m in ("small batch", "LARS", "CLARS")}
    rows = [["ResNet-50" + ("" if ctx.scale == "paper" else " (stand-in: BN-MLP)")] + list(measured.values())
            + [f"{v:.1f}" for v in PAPER_T1["ResNet-50"]]]
    rows += [[m, "not run", "not run", "not run"] + [f"{v:.1f}" for v in p] for m, p in PAPER_T1.items() if m != "ResNet-50"]
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for m in ("LARS", "CLARS", "small batch"):
        E.plot_curve(axes[0], E.where(results, method=m), "train_loss", m)
        E.plot_curve(axes[1], E.where(results, method=m), "test_acc", m, 100)
    for ax, t in zip(axes, ("training loss", "test top-1 %")):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    E.legend(axes[1], fontsize=8)
    return "\n".join([
        f"Final top-1 %: small batch (SGD, B = {s['small']}, LR 0.1, cosine), LARS (B = {s['batch']}, eta 1e-3, LR "
        f"{s['lr']:g}, {s['warmup']:g} warm-up epochs + polynomial decay) and CLARS (eta 1e-2, no warm-up); measured "
        "beside the paper's Table 1 (ImageNet). DenseNet-121 and MobileNetV2 are not in the harness.", "",
        E.table(["model", "small batch", "LARS", "CLARS", "paper small", "paper LARS", "paper CLARS"], rows), "",
        verdict_section(ctx, TABLE1_CLAIMS, {m: outcomes(E.where(results, method=m))
                                             for m in ("small batch", "LARS", "CLARS")}),
        E.save(ctx, fig, "table1.png")])


TABLE1_CLAIMS = (
    V.Claim("clars-matches-lars", "CLARS without warm-up at least as good as LARS with it (Table 1: 75.1 vs 75.1)",
            "CLARS", "LARS", "noninferior", 1.0),
)


TABLE1_ART = Artifact(
    "clars-table1", "CLARS Table 1 / Fig. 4: LARS vs CLARS on ImageNet at B = 16K",
    "At B = 16K, does CLARS without warm-up converge faster than LARS with warm-up and generalize at least as well?",
    {"paper": "ImageNet (ImageFolder, streamed with the papers' transforms) / ResNet-50, B = 16384 by accumulation of "
              "512, 90 epochs, gamma_scale (LR) 25 with polynomial decay; LARS eta 1e-3 + 5 warm-up epochs, CLARS eta "
              "1e-2 without; weight decay 1e-4 and the small-batch run (SGD, B = 256, LR 0.1, cosine) not stated",
     "mini": f"{MINI_NOTE}; B = 16384 by accumulation of 2048, 30 epochs (LARS warm-up 1.67), LR 25; small batch: SGD "
             "B = 256",
     "smoke": "plumbing only: a generated 3-class ImageFolder, a tiny BN-MLP, 2 epochs"},
    table1_grid, table1_collect,
    prepare=lambda ctx: make_tiny_imagenet(os.path.join(ctx.root, "tiny-imagenet")) if ctx.scale == "smoke" else None)

ARTIFACTS = (FIG1_ART, FIG2_ART, FIG3_ART, TABLE1_ART)
