"""The batch-size scaling study (Shallue et al. 2019, "Measuring the Effects of Data Parallelism on
Neural Network Training"), with the critical batch size of McCandlish et al. 2018 beside it.

For each optimizer (momentum SGD, LARS, LAMB, TVLARS, LALC) and batch size ``B = 2^k``: the optimizer
steps ``S`` (and examples ``E = B S``) to reach a target held-out accuracy, with the learning rate
tuned per batch size under an equal budget (the same LR multipliers of each optimizer's reference LR
at ``B``, as in the fair-baselines artifact: ``fair.OPTIMIZERS``), the best trial per batch size by its
mean over seeds. A trial trains at a constant LR (TVLARS: its own ``phi(t)``) until the target is met,
evaluating at steps ``1, 2, ...`` growing by ``EVAL_GROWTH`` (so ``S`` is known to that resolution),
or until ``max_epochs`` have passed (then it did not reach it).

The fit: McCandlish et al.'s ``(S / S_min - 1)(E / E_min - 1) = 1`` is ``S(B) = S_min + E_min / B``
(:func:`fit_scaling`), whose critical batch size is ``B_crit = E_min / S_min``: below it, doubling the
batch nearly halves the steps (perfect scaling), above it the steps approach ``S_min``. Each trial also
measures the gradient noise scale ``B_simple`` (two micro-batches per step, :mod:`largebatch.noise_scale`),
printed beside the fit: McCandlish et al. find ``B_crit ~ B_simple``.

Verdicts (:func:`verdicts`), by the rule every artifact uses (:mod:`largebatch.experiments.verdicts`): one
claim per layer-wise optimizer, "it extends perfect scaling beyond momentum SGD's critical batch size",
on ``log2(B_crit / B_crit(SGD))``, direction ``greater``, smallest effect that matters ``MIN_EFFECT`` = 1
(twice SGD's ``B_crit``: one more doubling of the batch at near-perfect scaling). ``B_crit`` is fitted to
all seeds at once, so its interval is the seed bootstrap's (seeds resampled, the LR choice and the fit
redone in each replicate; paired across optimizers), with the bootstrap p-value; Holm-corrected over the
claims.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .. import engine as E
from .. import verdicts as V
from ..engine import Artifact, Ctx, Run
from .common import MINI, SMOKE
from .fair import OPTIMIZERS as FAIR

OPTIMIZERS = ("sgd", "lars", "lamb", "tvlars", "lalc")
EVAL_GROWTH = 1.1  # evaluation steps: each at least 10% after the previous one
BOOTSTRAP = 1000
MIN_POINTS = 3  # batch sizes that reached the target, for a fit (two points always fit the curve exactly)
MIN_EFFECT = 1.0  # log2 of the B_crit ratio that matters: twice momentum SGD's critical batch size
NAMES = {"sgd": "momentum SGD", "lars": "LARS", "lamb": "LAMB", "tvlars": "TVLARS", "lalc": "LALC"}
SCALE = {
    "paper": dict(data=dict(dataset="cifar10", model="resnet18", stem="cifar", augment=True),
                  batches=tuple(2 ** k for k in range(5, 14)), multipliers=(1 / 4, 1 / 2, 1, 2, 4), target=0.90,
                  max_epochs=100, optimizers=OPTIMIZERS, noise_batch=256),
    "mini": dict(data=dict(MINI, dataset="fashion-mnist-val"), batches=(64, 256, 1024, 4096),
                 multipliers=(1 / 9, 1 / 3, 1, 3, 9), target=0.85, max_epochs=6, optimizers=OPTIMIZERS, noise_batch=256),
    "smoke": dict(data=SMOKE, batches=(32, 128, 512), multipliers=(1,), target=0.5, max_epochs=8,
                  optimizers=("sgd", "lars"), noise_batch=64),
}


# ----------------------------------------------------------------------------- one trial
def eval_steps(max_steps: int, growth: float = EVAL_GROWTH) -> list[int]:
    """``1, 2, ...``, each step at least ``growth`` times the previous one, and ``max_steps``."""
    out, s = [], 1
    while s < max_steps:
        out.append(s)
        s = max(s + 1, math.ceil(s * growth))
    return out + [max_steps]


def steps_to_target(out_dir: str, *, target: float, max_epochs: float, noise: bool = False,
                    **fields) -> dict[str, Any]:
    """Train ``fields`` (``TrainConfig`` fields) until the held-out accuracy reaches ``target``; the
    first evaluation step where it does (``steps``, ``None`` if never within ``max_epochs``), the
    examples and the accuracy curve. ``noise``: each step in two micro-batches (BatchNorm then sees
    half batches) and the noise scale ``B_simple`` (EMA; its mean over the run and its value when the
    target was met) from the two; otherwise one batch and no measurement."""
    import torch
    import torch.nn.functional as F

    from largebatch import noise_scale as ns
    from largebatch.train import data as data_mod
    from largebatch.train.config import resolve
    from largebatch.train.distributed import DistInfo, pick_device
    from largebatch.train.evaluate import evaluate
    from largebatch.train.factory import build_single_process, steps_per_epoch

    cfg = resolve(overrides={**fields, "out_dir": out_dir})
    device = pick_device(cfg.device)
    ds = E._dataset(cfg).to(device)
    b, n = cfg.batch_size, ds.train_x.shape[0]
    spe = steps_per_epoch(n, b, 1, True)
    max_steps = max(1, int(max_epochs * spe))
    model, opt, sched = build_single_process(cfg, ds, device, spe)
    params = [p for p in model.parameters() if p.requires_grad]
    meter = ns.MicroBatchNorms(params, b_small=b // 2, b_big=b) if noise else None
    ema = ns.NoiseScaleEMA(cfg.noise_scale_ema)
    parts, history = (2 if noise else 1), []
    augment = ds.augment_default if cfg.augment is None else cfg.augment
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    info = DistInfo(device=device)
    checks = set(eval_steps(max_steps))
    curve, reached, t0 = [], None, time.perf_counter()
    order, pos = torch.randperm(n, device=device, generator=gen), 0
    for step in range(1, max_steps + 1):
        if pos + b > n:
            order, pos = torch.randperm(n, device=device, generator=gen), 0
        idx = order[pos:pos + b]
        pos += b
        for j, ch in enumerate(idx.split(b // parts)):
            x = ds.train_x[ch]
            if augment:
                x = data_mod.random_crop_flip(x, gen)
            loss = F.cross_entropy(model(data_mod.normalize(x, ds.mean, ds.std)), ds.train_y[ch], reduction="sum")
            (loss / b).backward()
            if meter is not None:
                meter.micro_batch_done(2.0, last=j == 1)
        if meter is not None:
            ema.update(*ns.unbiased_estimates(*meter.measure(), meter.b_small, meter.b_big))
            history.append(ema.value())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        if step in checks:
            _, acc = evaluate(model, ds, cfg.eval_batch_size, info)
            curve.append([step, acc])
            if not math.isfinite(acc) or acc >= target:
                reached = step if acc >= target else None
                break
    out = {"reached": reached is not None, "steps": reached, "examples": None if reached is None else reached * b,
           "batch": b, "max_steps": max_steps, "curve": curve, "seconds": time.perf_counter() - t0}
    if history:
        values = torch.stack(history).tolist()
        out.update(noise_scale=values[-1], noise_scale_mean=sum(values) / len(values),
                   noise_curve=[[i + 1, v] for i, v in enumerate(values)][:: max(1, len(values) // 200)])
    return out


def noise_at_init(out_dir: str, *, batches: int, **fields) -> dict[str, Any]:
    """``B_simple`` of the freshly initialised model, from exact per-sample norms over ``batches`` batches."""
    from largebatch.train.config import resolve

    from ..noise_scale import measure

    cfg = resolve(overrides={**fields, "out_dir": out_dir, "noise_scale_method": "per_sample"})
    res = measure(cfg, steps=0, init_batches=batches, log=lambda s: None, dataset=E._dataset(cfg))
    return {"noise_scale": res["init"].value, "batch": cfg.batch_size, "batches": batches}


# ----------------------------------------------------------------------------- the grid
def trial_config(opt: str, batch: int, mult: float) -> dict[str, Any]:
    fixed, ref, _ = FAIR[opt]
    cfg = {**fixed, "lr": float(f"{ref(batch) * mult:.4g}"), "batch_size": batch, "epochs": 1}
    if opt == "tvlars":
        cfg.update(tvlars_delay_epochs=0.0)
    else:
        cfg.update(schedule="none")
    return cfg


def grid(ctx: Ctx) -> list[Run]:
    s = SCALE[ctx.scale]
    nb = s["noise_batch"]
    runs = [Run(f"noise-init-s{x}", {**s["data"], "batch_size": nb, "seed": x, "optimizer": "sgd", "batches": 8},
                dict(stage="noise", seed=x), kind="call", call=noise_at_init) for x in ctx.seeds]
    runs += [Run(f"noise-sgd-b{nb}-s{x}", {**s["data"], **trial_config("sgd", nb, 1), "seed": x, "target": s["target"],
                                           "max_epochs": s["max_epochs"], "noise": True},
                 dict(stage="noise-run", seed=x), kind="call", call=steps_to_target) for x in ctx.seeds]
    for opt in s["optimizers"]:
        for b in s["batches"]:
            for m in s["multipliers"]:
                c = trial_config(opt, b, m)
                runs += [Run(f"{opt}-b{b}-lr{c['lr']:g}-s{x}",
                             {**s["data"], **c, "seed": x, "target": s["target"], "max_epochs": s["max_epochs"]},
                             dict(stage="trial", optimizer=opt, batch=b, mult=m, seed=x), kind="call",
                             call=steps_to_target) for x in ctx.seeds]
    return runs


# ----------------------------------------------------------------------------- the fit
def fit_scaling(batches: list[float], steps: list[float]) -> tuple[float, float]:
    """``(S_min, E_min)`` of ``S(B) = S_min + E_min / B`` (McCandlish et al. 2018, Sec. 2, i.e.
    ``(S/S_min - 1)(E/E_min - 1) = 1`` with ``E = B S``), by least squares on the relative errors
    ``(S_i - S(B_i)) / S_i`` (closed form), both constrained to be >= 0. Needs 2 points or more."""
    pts = [(float(b), float(s)) for b, s in zip(batches, steps) if s is not None and math.isfinite(s) and s > 0]
    if len(pts) < 2:
        raise ValueError(f"fit: need steps at 2 batch sizes or more, got {len(pts)}")
    # weighted least squares: rows (1/S_i, 1/(B_i S_i)) . (S_min, E_min) = 1
    a11 = sum(1 / s ** 2 for b, s in pts)
    a12 = sum(1 / (b * s ** 2) for b, s in pts)
    a22 = sum(1 / (b * s) ** 2 for b, s in pts)
    r1 = sum(1 / s for b, s in pts)
    r2 = sum(1 / (b * s) for b, s in pts)
    det = a11 * a22 - a12 * a12
    if det > 1e-12 * a11 * a22:
        s_min, e_min = (r1 * a22 - r2 * a12) / det, (r2 * a11 - r1 * a12) / det
        if s_min >= 0 and e_min >= 0:
            return s_min, e_min

    def sse(sm, em):
        return sum((1 - (sm + em / b) / s) ** 2 for b, s in pts)

    only_s, only_e = (r1 / a11, 0.0), (0.0, r2 / a22)  # the boundary solutions
    return min(only_s, only_e, key=lambda p: sse(*p))


def critical_batch(s_min: float, e_min: float) -> float:
    return e_min / s_min if s_min > 0 else math.inf


def best_mults(trials: dict[tuple[float, float], list[float]]) -> dict[float, float]:
    """Per batch size, the LR multiplier :func:`best_steps` chose (all seeds)."""
    out: dict[float, tuple[float, float]] = {}
    for (b, m), xs in trials.items():
        v = sum(xs) / len(xs)
        if math.isfinite(v) and v < out.get(b, (math.inf, 0.0))[0]:
            out[b] = (v, m)
    return {b: m for b, (_, m) in sorted(out.items())}


def best_steps(trials: dict[tuple[float, float], list[float]], seeds: list[int] | None = None) -> dict[float, float]:
    """Per batch size, the steps of the best learning rate: ``trials[(batch, mult)]`` holds the steps of
    each seed (``inf`` when the target was not reached); the best LR is the lowest mean over ``seeds``
    (indices into those lists; all by default). Batch sizes where no LR reached the target are left out."""
    out: dict[float, float] = {}
    for (b, _), xs in trials.items():
        pick = [xs[i] for i in seeds] if seeds is not None else xs
        m = sum(pick) / len(pick)
        if math.isfinite(m) and m < out.get(b, math.inf):
            out[b] = m
    return dict(sorted(out.items()))


def bootstrap_bcrit(trials: dict[tuple[float, float], list[float]], reps: int = BOOTSTRAP,
                    seed: int = 0) -> list[float]:
    """``B_crit`` of ``reps`` bootstrap replicates: seeds resampled with replacement (the same draw for
    every cell: a seed is one unit), the LR choice and the fit redone; NaN for a replicate with fewer
    than ``MIN_POINTS`` batch sizes at the target (so that replicate ``i`` of two optimizers used the
    same draw). Empty with one seed."""
    import random

    n = min(len(xs) for xs in trials.values()) if trials else 0
    if n < 2:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(reps):
        draw = [rng.randrange(n) for _ in range(n)]
        best = best_steps(trials, draw)
        out.append(critical_batch(*fit_scaling(list(best), list(best.values()))) if len(best) >= MIN_POINTS
                   else math.nan)
    return out


percentile = V.percentile


def claim(opt: str, baseline: str = "sgd") -> V.Claim:
    """"``opt`` extends perfect scaling beyond ``baseline``'s critical batch size", on the log2 ratio."""
    return V.Claim(f"{opt}-extends", f"{NAMES.get(opt, opt)} extends perfect scaling beyond {NAMES.get(baseline, baseline)}'s "
                   f"critical batch size (log2 B_crit ratio; {MIN_EFFECT:g} = x{2 ** MIN_EFFECT:g})", opt, baseline,
                   "greater", MIN_EFFECT, needs_control=False)


def _log2_ratio(a: float, c: float) -> float:
    """``log2(a / c)`` for a baseline ``c`` in ``(0, inf)``: ``-inf`` / ``inf`` for ``a`` = 0 / inf; NaN otherwise."""
    if math.isnan(a) or not 0 < c < math.inf:
        return math.nan
    return -math.inf if a == 0 else math.inf if a == math.inf else math.log2(a / c)


def verdicts(per_opt: dict[str, dict[str, Any]], baseline: str = "sgd", optimizers=None) -> list[V.Verdict]:
    """The claim of :func:`claim` for each optimizer of ``optimizers`` (default: those in ``per_opt``) but
    ``baseline``, by the shared rule: the difference is ``log2(B_crit / B_crit(baseline))``, its interval and
    p-value from the paired bootstrap replicates (:func:`bootstrap_bcrit` draws the same seeds for every
    optimizer, and a seed is the same initialisation and data order in every study), Holm-corrected together.
    ``per_opt[opt]``: ``b_crit``, ``boot`` (replicates) and ``seeds``. ``extra``: both ``B_crit``, the ratio and
    its interval. An optimizer without results: not run; one seed, or no fit: inconclusive."""
    opts = [o for o in (optimizers if optimizers is not None else per_opt) if o != baseline]
    base = per_opt.get(baseline, {})
    bc = base.get("b_crit", math.nan)
    out = []
    for opt in opts:
        r = per_opt.get(opt, {})
        a = r.get("b_crit", math.nan)
        diff = _log2_ratio(a, bc)
        reps = [_log2_ratio(x, y) for x, y in zip(r.get("boot", []), base.get("boot", []))]
        v = V.from_bootstrap(claim(opt, baseline), diff, reps, n_arm=r.get("seeds", 0), n_base=base.get("seeds", 0),
                             mean_arm=_log2_ratio(a, 1.0), mean_base=_log2_ratio(bc, 1.0))
        v.extra = {"b_crit": a, "baseline_b_crit": bc, "ratio": 2 ** diff if not math.isnan(diff) else math.nan,
                   "ratio_ci": [2 ** x if not math.isnan(x) else math.nan for x in (v.lo, v.hi)],
                   "replicates": sum(not math.isnan(x) for x in reps)}
        if v.note == "no interval" and math.isnan(diff):
            no_fit = [NAMES.get(o, o) for o, x in ((opt, a), (baseline, bc)) if math.isnan(x)]
            v.note = (f"no fit for {' and '.join(no_fit)} (target met at fewer than {MIN_POINTS} batch sizes)" if no_fit
                      else f"{NAMES.get(baseline, baseline)}'s B_crit is {bc:g}: no ratio")
        out.append(v)
    return V.conclude(out)


# ----------------------------------------------------------------------------- collect
def summarize(results: list[E.Result], ctx_seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per optimizer: the steps of every (batch, LR) over seeds, the best per batch, the fit, bootstrap."""
    per: dict[str, dict[str, Any]] = {}
    for r in results:
        t = r.run.tags
        if t.get("stage") != "trial" or r.status != "finished":
            continue
        d = per.setdefault(t["optimizer"], {"trials": {}})
        v = r.value
        d["trials"].setdefault((t["batch"], t["mult"]), {})[t["seed"]] = v["steps"] if v["reached"] else math.inf
    for opt, d in per.items():
        seeds = sorted({s for xs in d["trials"].values() for s in xs})
        trials = {k: [xs.get(s, math.inf) for s in seeds] for k, xs in d["trials"].items()
                  if all(s in xs for s in seeds)}
        d["trials"] = trials
        d["best"] = best_steps(trials)
        if len(d["best"]) >= MIN_POINTS:
            d["s_min"], d["e_min"] = fit_scaling(list(d["best"]), list(d["best"].values()))
            d["b_crit"] = critical_batch(d["s_min"], d["e_min"])
        else:
            d["s_min"] = d["e_min"] = d["b_crit"] = math.nan
        d["boot"] = bootstrap_bcrit(trials)
        d["seeds"] = len(seeds)
    return per


def _json_safe(v):
    """NaN and infinities as ``null`` (strict JSON), tuples as lists."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def collect(ctx: Ctx, results: list[E.Result]) -> str:
    from largebatch.plotting import pyplot

    s = SCALE[ctx.scale]
    per = summarize(results, ctx.seeds)
    init = E.values(E.where(results, stage="noise"), lambda r: r.value["noise_scale"])
    noise_runs = [r for r in E.where(results, stage="noise-run") if r.status == "finished"]
    fig, (a, b_ax, n_ax) = pyplot().subplots(1, 3, figsize=(17, 4.4))
    rows, step_rows = [], []
    for i, opt in enumerate(s["optimizers"]):
        d = per.get(opt)
        c = f"C{i}"
        if d is None or not d["best"]:
            rows.append([opt, "-", "-", "-", "-"])
            continue
        bs, ss = list(d["best"]), list(d["best"].values())
        a.plot(bs, ss, "o-", color=c, label=opt)
        b_ax.plot(bs, [b * x for b, x in zip(bs, ss)], "o-", color=c, label=opt)
        if math.isfinite(d["b_crit"]):
            xs = [2 ** (k / 8) for k in range(int(8 * math.log2(min(bs))), int(8 * math.log2(max(bs))) + 1)]
            a.plot(xs, [d["s_min"] + d["e_min"] / x for x in xs], ":", color=c, linewidth=1)
        lo, hi = percentile(d["boot"], 0.025), percentile(d["boot"], 0.975)
        ci = f"[{lo:.0f}, {hi:.0f}]" if d["boot"] else "- (one seed)"
        if math.isfinite(d["s_min"]):
            rows.append([opt, f"{d['s_min']:.1f}", f"{d['e_min']:.0f}", f"{d['b_crit']:.0f}", ci])
        else:
            rows.append([opt, f"- (target met at {len(d['best'])} batch sizes; a fit needs {MIN_POINTS})", "-", "-",
                         "-"])
        if math.isfinite(d["b_crit"]):
            n_ax.axhline(d["b_crit"], color=c, linestyle=":", linewidth=1, label=f"B_crit fit: {opt}")
        mults = best_mults(d["trials"])
        ends = (min(s["multipliers"]), max(s["multipliers"])) if len(s["multipliers"]) > 1 else ()
        edge = {b for b, m in mults.items() if m in ends}
        step_rows.append([opt] + [("-" if b not in d["best"] else f"{d['best'][b]:.0f}" + (" *" if b in edge else ""))
                                  for b in s["batches"]])
    # perfect scaling: S proportional to 1/B through the smallest batch of the first optimizer drawn
    first = next((per[o] for o in s["optimizers"] if o in per and per[o]["best"]), None)
    if first is not None:
        b0, s0 = next(iter(first["best"].items()))
        bs = list(s["batches"])
        a.plot(bs, [s0 * b0 / b for b in bs], "k--", linewidth=1, label="perfect scaling")
    for ax, name in ((a, "steps to target"), (b_ax, "examples to target")):
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=name)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        E.legend(ax, fontsize=7)
    a.set_title(f"(a) steps to {100 * s['target']:.0f}% held-out accuracy (dotted: fit)")
    b_ax.set_title("(b) examples to target")
    for j, r in enumerate(noise_runs):
        pts = r.value.get("noise_curve", [])
        n_ax.plot([p[0] for p in pts], [p[1] for p in pts], color="k", alpha=0.8 - 0.2 * min(j, 3),
                  label="B_simple (EMA), SGD B = %d" % s["noise_batch"] if j == 0 else None)
    n_ax.set(xlabel="step", ylabel="examples", yscale="log", title="(c) noise scale over training vs fitted B_crit")
    n_ax.grid(alpha=0.3, which="both")
    E.legend(n_ax, fontsize=7)
    at_target = [r.value["noise_scale"] for r in noise_runs if r.value.get("reached")]
    mean_run = [r.value["noise_scale_mean"] for r in noise_runs]
    vs = verdicts(per, optimizers=s["optimizers"])
    V.save(ctx.root, ctx.artifact.id, vs, E.stamp(ctx), **_json_safe({
        "fits": {o: {k: d[k] for k in ("s_min", "e_min", "b_crit", "seeds")} | {
            "ci95": [percentile(d["boot"], 0.025), percentile(d["boot"], 0.975)],
            "replicates": sum(not math.isnan(x) for x in d["boot"])}
            for o, d in per.items()},
        "noise_scale": {"init": init, "at_target": at_target, "run_mean": mean_run}}))
    vrows = [[NAMES.get(v.claim.arm, v.claim.arm), V._f(v.extra["b_crit"], ".0f"), V._f(v.extra["ratio"], ".2f"),
              "-" if math.isnan(v.lo) else "[{:.2f}, {:.2f}]".format(*v.extra["ratio_ci"]), V._f(v.diff),
              "-" if math.isnan(v.lo) else f"[{v.lo:+.2f}, {v.hi:+.2f}]", V._f(v.p_holm, ".3g"),
              f"**{v.verdict}**" + (f" ({v.note})" if v.note else "")] for v in vs]
    seconds = sum(r.value.get("seconds", 0.0) for r in results if r.status == "finished")
    return "\n".join([
        f"Target {100 * s['target']:.0f}% held-out accuracy; LR tuned per batch size over {len(s['multipliers'])} "
        f"multipliers of each optimizer's reference LR (x{', x'.join(f'{m:.3g}' for m in s['multipliers'])}), "
        f"constant LR (TVLARS: phi(t)), at most {s['max_epochs']} epochs per trial. Fit: "
        "(S/S_min - 1)(E/E_min - 1) = 1, i.e. S = S_min + E_min / B; B_crit = E_min / S_min (McCandlish et al. "
        "2018), bootstrap 95% interval over seeds (the LR choice and the fit redone in each of "
        f"{BOOTSTRAP} replicates).", "",
        E.table(["optimizer", "S_min", "E_min", "B_crit (fit)", "B_crit 95% CI"], rows), "",
        "**Measured noise scale B_simple** (mean ± std over seeds), beside the fitted B_crit: at initialisation "
        f"(exact per-sample norms, 8 batches of {s['noise_batch']}): {E.fmt(init, '.0f') if init else '-'}; "
        f"momentum SGD at B = {s['noise_batch']} in two micro-batches, EMA when the target was met: "
        f"{E.fmt(at_target, '.0f') if at_target else '-'}, mean over that run: "
        f"{E.fmt(mean_run, '.0f') if mean_run else '-'}. With BatchNorm the two estimators differ "
        "(docs/batch-size.md).", "",
        "### Steps to target (best LR per batch size, mean over seeds)", "",
        E.table(["optimizer"] + [f"B = {b}" for b in s["batches"]], step_rows), "",
        "`*`: the best LR is at the edge of the grid (the lowest or highest multiplier), so the optimum may lie "
        "outside it and the steps are an upper bound.", "",
        "### Verdict: does an optimizer extend perfect scaling beyond momentum SGD's critical batch size?", "",
        E.table(["optimizer", "B_crit (fit)", "B_crit / B_crit(SGD)", "95% CI", "log2 ratio", "95% CI", "Holm p",
                 "verdict"], vrows) if vrows else "No verdict yet.", "",
        f"Claim per optimizer: \"it extends perfect scaling beyond momentum SGD's critical batch size\", on the log2 "
        f"ratio of the fitted B_crit, direction greater, smallest effect that matters {MIN_EFFECT:g} (x{2 ** MIN_EFFECT:g}). "
        "Verdict rule: `largebatch.experiments.verdicts` (reproduced: Holm p < 0.05 and the ratio at least that; "
        "contradicted: the interval excludes it; otherwise inconclusive), with the seed bootstrap's 95% percentile "
        "interval (replicates paired across optimizers) and its two-sided p-value, Holm-corrected over these claims.",
        "", f"Compute: {seconds:.0f} s of training and evaluation in the finished runs.", "",
        E.save(ctx, fig, "batch_scaling.png")])


ARTIFACT = Artifact(
    "batch-scaling", "Beyond the papers: steps to target vs batch size per optimizer (Shallue et al. 2019), "
    "critical batch size vs the gradient noise scale (McCandlish et al. 2018)",
    "Does any layer-wise optimizer (LARS, LAMB, TVLARS, LALC) extend perfect scaling beyond momentum SGD's "
    "critical batch size, and does the fitted critical batch size match the measured noise scale?",
    {"paper": "CIFAR-10 / ResNet-18 (CIFAR stem, augmentation), B = 32 ... 8192, 5 LR multipliers per batch size, "
              "target 90% test accuracy, at most 100 epochs per trial",
     "mini": "Fashion-MNIST (50k train / 10k held out), BN-MLP 3 x 256, B = 64, 256, 1024, 4096, 5 LR multipliers, "
             "target 85% held-out accuracy, at most 6 epochs per trial",
     "smoke": "plumbing only: digits, tiny BN-MLP, SGD and LARS at B = 32, 128, 512, one LR, target 50%"},
    grid, collect, seeds={"paper": 1, "mini": 3, "smoke": 1})
