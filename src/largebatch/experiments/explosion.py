"""``largebatch explosion``: gradient-explosion analysis of normalized networks (LALC paper).

Actions::

    largebatch explosion theory   [--samples N] [--out DIR]          # Prop. 1 vs Monte Carlo, factors per activation
    largebatch explosion rates    --arch A [A ...] --act F [F ...]   # Fig. 1: measured rate per architecture/activation
    largebatch explosion compare  [--quick]                          # theory vs measured table (Thm. 1-2, Cor. 2, LN)
    largebatch explosion dynamics [--steps N]                        # Fig. 3: early-training dynamics
    largebatch explosion plot     --out DIR                          # redraw figures from the JSON files in DIR

With ``--out DIR`` every action writes ``explosion_<tag>.json`` and its figure
``explosion_<tag>.png`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from largebatch.analysis.names import ACTIVATIONS, ARCHITECTURES

# per-architecture default sizes: (depth, width, batch)
DEFAULT_SIZES = {
    "mlp-bn": (24, 512, 1024), "mlp-ln": (24, 512, 1024), "vgg-bn": (51, 16, 128),
    "resnet-bn": (9, 16, 128), "transformer-ln": (12, 64, 128),
}


def _pos_int(name):
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {s!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {v}")
        return v
    return conv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("theory", help="Proposition 1 vs Monte Carlo; theoretical per-block factors")
    p.add_argument("--samples", type=_pos_int("--samples"), default=4_000_000, help="Monte Carlo samples per (mu, sigma)")
    p.add_argument("--mu", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    p.add_argument("--sigma", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for explosion_prop1.json/.png")

    p = sub.add_parser("rates", help="measure the explosion rate at initialization (Fig. 1)")
    p.add_argument("--arch", nargs="+", default=["mlp-bn"], choices=ARCHITECTURES)
    p.add_argument("--act", nargs="+", default=["relu"], choices=ACTIVATIONS)
    p.add_argument("--depth", type=_pos_int("--depth"), help="blocks (default per arch: %s)" % DEFAULT_SIZES)
    p.add_argument("--width", type=_pos_int("--width"), help="units / base channels (default per arch)")
    p.add_argument("--batch", type=_pos_int("--batch"), help="batch size (default per arch)")
    p.add_argument("--seeds", type=_pos_int("--seeds"), default=3, help="number of seeds (0..S-1)")
    p.add_argument("--image-size", type=_pos_int("--image-size"), default=16)
    p.add_argument("--loss", choices=("projection", "ce"), default="projection")
    p.add_argument("--trim", type=float, default=0.25, help="fraction of blocks dropped at each end for the factor fit")
    p.add_argument("--tag", default="rates", help="file name tag: explosion_<tag>.json/.png")
    p.add_argument("--bars", action="store_true", help="draw the Fig. 1b bar chart instead of rate curves")
    p.add_argument("--out", help="output directory")

    p = sub.add_parser("compare", help="theory vs measured table (Thm. 1, Cor. 2, Thm. 2, LayerNorm, activations)")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds); default sizes take minutes")
    p.add_argument("--seeds", type=_pos_int("--seeds"), default=3)
    p.add_argument("--out", help="directory for explosion_compare.json/.md")

    p = sub.add_parser("dynamics", help="early-training dynamics (Fig. 3)")
    p.add_argument("--depth", type=_pos_int("--depth"), default=10)
    p.add_argument("--width", type=_pos_int("--width"), default=128)
    p.add_argument("--act", default="relu", choices=ACTIVATIONS)
    p.add_argument("--norm", default="bn", choices=("bn", "ln"))
    p.add_argument("--steps", type=_pos_int("--steps"), default=200)
    p.add_argument("--log-every", type=_pos_int("--log-every"), default=10)
    p.add_argument("--batch", type=_pos_int("--batch"), default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--init-std", type=float, default=0.01)
    p.add_argument("--data", default="digits", choices=("digits", "synthetic"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for explosion_dynamics.json/.png")

    p = sub.add_parser("plot", help="redraw figures from explosion_*.json in --out")
    p.add_argument("--out", required=True)


def _md(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _f(v, nd=4):
    return "-" if v is None else f"{v:.{nd}f}"


def _write(out, tag, payload):
    if not out:
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"explosion_{tag}.json")
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    return path


def run_theory(args) -> int:
    from largebatch.analysis import architectures as A
    from largebatch.analysis import theory

    rows = theory.prop1_grid(args.mu, args.sigma, n=args.samples, seed=args.seed)
    print(f"Proposition 1 (eq. 1-2) vs Monte Carlo ({args.samples} samples each)")
    print(_md([[r["mu"], r["sigma"], _f(r["mean_theory"], 5), _f(r["mean_mc"], 5), f"{r['mean_rel_err']:.1e}",
                 _f(r["var_theory"], 5), _f(r["var_mc"], 5), f"{r['var_rel_err']:.1e}"] for r in rows],
              ["mu", "sigma", "E theory", "E MC", "rel err", "Var theory", "Var MC", "rel err"]))
    acts = [a for a in ACTIVATIONS if a != "dropout"]
    fac = {a: theory.activation_factor(lambda z, m=A.make_activation(a): m(z)) for a in acts}
    fac["dropout"] = 1.0
    print("\nPer-block factor E[f'(z)^2]/Var f(z), z ~ N(0,1) (Thm. 1 generalized; dropout: exactly 1)")
    print(_md([[a, _f(v)] for a, v in fac.items()], ["activation", "factor"]))
    print(f"\nThm. 1 pi/(pi-1) = {theory.THM1_FACTOR:.4f}; Cor. 2 = 1; Thm. 2 as printed pi/(pi+2) = "
          f"{theory.THM2_PAPER_FACTOR:.4f}; Thm. 2 corrected Jensen bound = {theory.THM2_CORRECTED_FACTOR:.4f}")
    if args.out:
        _write(args.out, "prop1", {"rows": rows, "activation_factors": fac})
        from largebatch.analysis.plots import plot_prop1

        print("wrote", plot_prop1(rows, os.path.join(args.out, "explosion_prop1.png")))
    return 0


def run_rates(args) -> int:
    from largebatch.analysis.explosion import measure_architecture

    if not 0 <= args.trim < 0.5:
        raise ValueError(f"--trim must be in [0, 0.5), got {args.trim}")
    results = []
    for arch in args.arch:
        d0, w0, b0 = DEFAULT_SIZES[arch]
        for act in args.act:
            t0 = time.time()
            r = measure_architecture(arch, act, depth=args.depth or d0, width=args.width or w0,
                                     batch=args.batch or b0, seeds=tuple(range(args.seeds)), loss=args.loss,
                                     trim=args.trim, image_size=args.image_size)
            r["seconds"] = time.time() - t0
            results.append(r)
    rows = []
    for r in results:
        th = r["factor_theory"]
        rel = None if th is None else abs(r["factor_mean"] - th) / th
        rows.append([r["arch"], r["act"], r["depth"], r["width"], r["batch"], len(r["blocks"]),
                     f"{r['factor_mean']:.4f} ± {r['factor_std']:.4f}", _f(th), "-" if rel is None else f"{rel:.2%}",
                     f"{r['rate_mean'][0]:.3g}", f"{r['seconds']:.0f}"])
    print(_md(rows, ["arch", "act", "depth", "width", "batch", "norm. blocks", "factor (mean ± std over seeds)",
                     "theory", "rel err", "rate at input", "s"]))
    if args.out:
        _write(args.out, args.tag, {"kind": "bars" if args.bars else "rates", "results": results})
        _plot_one(args.out, args.tag)
    return 0


def _compare_rows(quick: bool, seeds: int) -> list[dict]:
    from largebatch.analysis import theory
    from largebatch.analysis.explosion import measure_architecture, single_block_correlated, single_block_independent

    S = tuple(range(seeds))
    depth, width, batch = (20, 512, 1024) if quick else (32, 1024, 2048)
    adepth, awidth, abatch = (20, 512, 1024) if quick else (24, 512, 1024)
    rows = []

    def add(claim, setting, predicted, measured, std=None, kind="equal"):
        rows.append({"claim": claim, "setting": setting, "predicted": predicted, "measured": measured,
                     "std": std, "kind": kind,
                     "rel_err": abs(measured - predicted) / abs(predicted)})

    sb = [single_block_independent(0.0, 1.0, seed=s) for s in S]
    add("Thm. 1 (single block)", "BN(W ReLU(x)), x_i ~ N(0,1), 512->512, B=8192",
        theory.THM1_FACTOR, _mean(x["measured"] for x in sb), _std(x["measured"] for x in sb))
    sb = [single_block_independent(8.0, 1.0, seed=s) for s in S]
    add("Cor. 2 (single block)", "same, x_i ~ N(8,1) (pseudo-linear)", 1.0,
        _mean(x["measured"] for x in sb), _std(x["measured"] for x in sb))
    for arch, act, claim in (("mlp-bn", "relu", "Thm. 1 (deep)"), ("mlp-bn", "identity", "Cor. 2 (deep, identity)"),
                             ("mlp-ln", "relu", "LayerNorm: no explosion")):
        r = measure_architecture(arch, act, depth, width, batch, seeds=S)
        add(claim, f"{arch} {act}, depth {depth}, width {width}, B={batch}", 1.0 if arch == "mlp-ln" else r["factor_theory"],
            r["factor_mean"], r["factor_std"], kind="upper" if arch == "mlp-ln" else "equal")
    for act in ("leaky_relu", "elu", "selu", "gelu", "silu", "softplus", "tanh", "dropout"):
        r = measure_architecture("mlp-bn", act, adepth, awidth, abatch, seeds=S)
        add(f"E[f'^2]/Var f ({act})", f"mlp-bn {act}, depth {adepth}, width {awidth}, B={abatch}", r["factor_theory"],
            r["factor_mean"], r["factor_std"])
    c = [single_block_correlated(256, 512, 16384, seed=s) for s in S]
    add("Thm. 2 as printed (lower bound)", "BN(W ReLU(b t)), 256->512, B=16384", theory.THM2_PAPER_FACTOR,
        _mean(x["measured"] for x in c), _std(x["measured"] for x in c), kind="lower")
    add("Thm. 2 corrected (lower bound)", "same", theory.THM2_CORRECTED_FACTOR,
        _mean(x["measured"] for x in c), _std(x["measured"] for x in c), kind="lower")
    add("Thm. 2 exact for the drawn W (eq. 16, 23)", "same, per seed", _mean(x["conditional"] for x in c),
        _mean(x["measured"] for x in c), _std(x["measured"] for x in c))
    add("Thm. 2 E[Var before BN] corrected eq. 24", "same", _mean(x["prenorm_var_expected"] for x in c),
        _mean(x["prenorm_var_mean"] for x in c), _std(x["prenorm_var_mean"] for x in c))
    return rows


def _mean(it):
    v = list(it)
    return sum(v) / len(v)


def _std(it):
    v = list(it)
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def run_compare(args) -> int:
    t0 = time.time()
    rows = _compare_rows(args.quick, args.seeds)
    kinds = {"equal": "=", "lower": ">=", "upper": "<="}
    table = _md([[r["claim"], r["setting"], kinds[r["kind"]] + " " + _f(r["predicted"]),
                  f"{r['measured']:.4f} ± {(r['std'] or 0):.4f}", f"{r['rel_err']:.2%}"] for r in rows],
                ["claim", "setting", "predicted", f"measured (mean ± std, {args.seeds} seeds)", "rel. diff"])
    print(table)
    print(f"\n({time.time() - t0:.0f} s)")
    if args.out:
        _write(args.out, "compare", {"quick": args.quick, "seeds": args.seeds, "rows": rows})
        with open(os.path.join(args.out, "explosion_compare.md"), "w") as fh:
            fh.write(table + "\n")
    return 0


def run_dynamics(args) -> int:
    from largebatch.analysis.dynamics import summarize, track_dynamics

    res = track_dynamics(depth=args.depth, width=args.width, act=args.act, steps=args.steps,
                         log_every=args.log_every, batch=args.batch, lr=args.lr, momentum=args.momentum,
                         init_std=args.init_std, data=args.data, seed=args.seed, norm=args.norm)
    print(_md([[r["step"], _f(r["loss"]), _f(r["acc"], 3), _f(r["factor"]), _f(r["corr_xx"]), _f(r["corr_xg"]),
                _f(r["mean_std"])] for r in summarize(res)],
              ["step", "loss", "acc", "factor (Var g^1/Var g^N)^(1/(N-1))", "mean |Corr(x_i,x_j)|",
               "mean |Corr(x_i,g_i)|", "|mean|/std"]))
    if args.out:
        _write(args.out, "dynamics", res)
        _plot_one(args.out, "dynamics")
    return 0


def _plot_one(out: str, tag: str) -> str:
    from largebatch.analysis import plots

    with open(os.path.join(out, f"explosion_{tag}.json")) as fh:
        data = json.load(fh)
    png = os.path.join(out, f"explosion_{tag}.png")
    if "metrics" in data:
        plots.plot_dynamics(data, png)
    elif "activation_factors" in data:
        plots.plot_prop1(data["rows"], png)
    elif data.get("kind") == "bars":
        plots.plot_activation_factors(data["results"], png)
    elif data.get("kind") == "rates":
        plots.plot_rates(data["results"], png)
    else:
        return ""
    print("wrote", png)
    return png


def run_plot(args) -> int:
    if not os.path.isdir(args.out):
        raise ValueError(f"--out must be an existing directory, got {args.out!r}")
    n = 0
    for f in sorted(os.listdir(args.out)):
        if f.startswith("explosion_") and f.endswith(".json"):
            n += bool(_plot_one(args.out, f[len("explosion_"):-len(".json")]))
    if n == 0:
        print(f"no explosion_*.json with a figure in {args.out}")
        return 1
    return 0


def run(args) -> int:
    return {"theory": run_theory, "rates": run_rates, "compare": run_compare,
            "dynamics": run_dynamics, "plot": run_plot}[args.action](args)
