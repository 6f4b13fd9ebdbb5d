"""The reproduction engine: an artifact (a table or figure of a paper) is a grid of runs per scale
plus a collect function; this module lists, runs, resumes and collects any of them.

Vocabulary:

- :class:`Run`: one ``largebatch train`` run (``kind="train"``, optionally with a custom
  :class:`~largebatch.train.loop.Task`), one ``largebatch pretrain`` + ``linear-eval`` run
  (``"pretrain"``), or one Python function whose result is a JSON dict (``"call"``: analyses that
  do not train through the harness). Its ``cfg`` holds the configuration fields it sets (the
  engine adds ``out_dir``); its ``tags`` are its coordinates in the artifact's table.
- :class:`Artifact`: id, title, question, a ``grid(ctx) -> [Run]`` and a ``collect(ctx, results) ->
  Markdown`` (which also draws the figure), with one line per scale saying what the scale runs.
- :class:`Ctx`: scale, seeds, the artifact's folder (``OUT/<artifact>/<scale>/``, one run
  directory per run, ``results.md`` and the figures) and the results of runs so far (a grid may
  depend on them: the fair-baselines artifact picks its final runs from a search).

Run states (:meth:`Ctx.result`): ``finished`` (all epochs, and the linear evaluation for
pre-training), ``partial`` (started: ``--run`` resumes it from its checkpoint), ``failed``
(``failure.json``: a non-finite loss; ``reproduce-error.json``: an exception; kept and reported,
rerun only with ``--retry-failed``) and ``missing``. A finished run is never redone.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import shlex
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from .._provenance import commit, cpu_model

SCALES = ("paper", "mini", "smoke")
ERROR_FILE = "reproduce-error.json"  # an exception stopped the run
RESULT_FILE = "result.json"  # what a "call" run computed


class UserError(Exception):
    """A mistake the user fixes (bad artifact, option, configuration or missing data): one line, exit 2."""


@dataclass
class Run:
    """One run of an artifact's grid (see the module docstring)."""

    name: str
    cfg: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    kind: str = "train"  # train | pretrain | call
    task: Callable[[], Any] | None = None  # train: a custom Task factory (default: classification)
    linear_epochs: int = 100  # pretrain: epochs of the linear classifier
    call: Callable[..., dict] | None = None  # call: fn(out_dir, **cfg) -> JSON-able dict
    home: str | None = None  # the artifact whose folder holds the run (shared runs: e.g. Table 1's cells)


@dataclass
class Result:
    """A run's state and what it left: the metrics rows (``history``), the linear evaluation
    (pretrain) or the computed dict (call) in ``value``, the failure message in ``error``."""

    run: Run
    status: str  # finished | partial | failed | missing
    path: str
    history: list[dict[str, Any]] = field(default_factory=list)
    value: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


@dataclass
class Artifact:
    """A table or figure: its runs at each scale and how to collect them."""

    id: str
    title: str  # "TVLARS Table 1: ..." (paper and table/figure)
    question: str  # the claim the artifact tests
    scales: dict[str, str]  # scale -> what it runs (and how it differs from the paper)
    grid: Callable[["Ctx"], list[Run]]
    collect: Callable[["Ctx", list[Result]], str]
    seeds: dict[str, int] = field(default_factory=lambda: {"paper": 1, "mini": 5, "smoke": 1})  # comparisons: >= 5
    prepare: Callable[["Ctx"], None] | None = None  # before --run (e.g. generate smoke data)
    missing: str = ""  # why a scale absent from ``scales`` is absent


@dataclass
class Ctx:
    """Where an artifact at one scale lives, and the state of its runs."""

    artifact: Artifact
    scale: str
    seeds: list[int]
    out: str  # root of all artifacts (--out)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set FIELD=VALUE, for every run that has FIELD

    @property
    def root(self) -> str:
        return os.path.join(self.out, self.artifact.id, self.scale)

    def path(self, run: Run) -> str:
        return os.path.join(self.out, run.home or self.artifact.id, self.scale, run.name)

    def grid(self) -> list[Run]:
        runs = self.artifact.grid(self)
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise RuntimeError(f"{self.artifact.id}: run names are not unique")
        return runs

    def config(self, run: Run) -> dict[str, Any]:
        """The run's configuration fields, with the ``--set`` overrides its config class has."""
        if run.kind == "call":
            return dict(run.cfg)
        names = _field_names(run.kind)
        cfg = {**run.cfg, **{k: v for k, v in self.overrides.items() if k in names}}
        cfg["out_dir"] = self.path(run)
        return cfg

    def resolved(self, run: Run):
        """The run's validated ``TrainConfig`` / ``PretrainConfig`` (``UserError`` if invalid)."""
        from largebatch.train.config import resolve

        try:
            return resolve(overrides=self.config(run), cls=_config_class(run.kind))
        except ValueError as e:
            raise UserError(f"{self.artifact.id} run {run.name}: invalid configuration: {e}") from None

    def result(self, run: Run) -> Result:
        """The run's state from its directory (see the module docstring)."""
        path = self.path(run)
        res = Result(run, "missing", path)
        err = _read_json(os.path.join(path, ERROR_FILE)) or _read_json(os.path.join(path, "failure.json"))
        if run.kind == "call":
            res.value = _read_json(os.path.join(path, RESULT_FILE)) or {}
            res.status = "finished" if res.value else "missing"
        else:
            try:
                res.history = _metrics(path)
            except ValueError as e:  # a damaged table: its message names the file
                raise UserError(f"{self.artifact.id} run {run.name}: {e}") from None
            if res.history and res.history[-1]["epoch"] >= self.resolved(run).epochs:
                res.status = "finished"
            elif os.path.exists(os.path.join(path, "config.yaml")):
                res.status = "partial"
            if run.kind == "pretrain":
                res.value = _read_json(os.path.join(path, "linear-eval", "pretrained.json")) or {}
                if res.status == "finished" and res.value.get("settings", {}).get("epochs") != run.linear_epochs:
                    res.status = "partial"  # pre-trained; the linear evaluation is missing
        if err is not None and res.status != "finished":
            res.status, res.error = "failed", err.get("message") or err.get("error") or "failed"
        return res

    def figure(self, name: str) -> str:
        os.makedirs(self.root, exist_ok=True)
        return os.path.join(self.root, name)


def _field_names(kind: str) -> set[str]:
    from dataclasses import fields

    return {f.name for f in fields(_config_class(kind))}


def _config_class(kind: str):
    if kind == "pretrain":
        from largebatch.train.pretrain import PretrainConfig

        return PretrainConfig
    from largebatch.train.config import TrainConfig

    return TrainConfig


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, default=float)
    os.replace(tmp, path)


def _metrics(path: str) -> list[dict[str, Any]]:
    from largebatch.train.rundir import read_table

    for ext in (".csv", ".jsonl"):
        p = os.path.join(path, "metrics" + ext)
        if os.path.exists(p):
            return read_table(p)
    return []


# ----------------------------------------------------------------------------- command lines
def command_line(ctx: Ctx, run: Run, set_args: list[str] = ()) -> str:
    """The shell command(s) of one run: ``largebatch train`` / ``pretrain && linear-eval`` (with
    ``--resume``, which starts a new run and continues a stopped one), or, for runs that need this
    package's Python (custom tasks, analyses), ``largebatch reproduce ... --run --only NAME``."""
    if run.kind == "call" or run.task is not None:
        args = ["largebatch", "reproduce", ctx.artifact.id, "--scale", ctx.scale, "--seeds", str(len(ctx.seeds)),
                "--out", ctx.out, "--run", "--only", run.name]
        for s in set_args:
            args += ["--set", s]
        return shlex.join(args)
    args = ["largebatch", run.kind]
    for k, v in ctx.config(run).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (tuple, list)):
            args += [flag, ",".join(map(str, v))]
        else:
            args += [flag, "none" if v is None else str(v)]
    line = shlex.join(args + ["--resume"])
    if run.kind == "pretrain":
        line += " && " + shlex.join(["largebatch", "linear-eval", ctx.path(run), "--epochs", str(run.linear_epochs)])
    return line


# ----------------------------------------------------------------------------- running
_DATA: dict[tuple, Any] = {}  # the last dataset loaded, reused by the next runs of this process


def _dataset(cfg):
    from largebatch.train import data as data_mod

    key = (cfg.dataset, cfg.data_dir)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = data_mod.load(cfg.dataset, cfg.data_dir, cfg.download)
    return _DATA[key]


def execute(ctx: Ctx, run: Run, retry_failed: bool = False, log: Callable[[str], None] = print,
            verbose: bool = False, progress: bool = False) -> Result:
    """Bring one run to ``finished`` if it can: nothing for a finished run; a failed one only when
    ``retry_failed`` (a non-finite run is started again, one stopped by an exception resumes);
    otherwise start or resume it. Exceptions other than user errors mark the run failed.
    ``progress``: a training run draws its bar of steps (in a terminal)."""
    res = ctx.result(run)
    if res.status == "finished" or (res.status == "failed" and not retry_failed):
        return res
    path = ctx.path(run)
    overwrite = res.status == "failed" and os.path.exists(os.path.join(path, "failure.json"))
    if os.path.exists(os.path.join(path, ERROR_FILE)):
        os.remove(os.path.join(path, ERROR_FILE))
    quiet = print if verbose else (lambda s: None)
    try:
        if run.kind == "call":
            os.makedirs(path, exist_ok=True)
            _write_json(os.path.join(path, RESULT_FILE), run.call(path, **run.cfg))
        else:
            _train(ctx, run, overwrite, quiet, progress)
    except (UserError, KeyboardInterrupt):
        raise
    except (ValueError, FileNotFoundError) as e:  # configuration, data, run directory: the user's to fix
        raise UserError(f"{ctx.artifact.id} run {run.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other failure is recorded with the run and the grid goes on
        from largebatch.train.rundir import RunDirError

        if isinstance(e, RunDirError):
            raise
        os.makedirs(path, exist_ok=True)
        _write_json(os.path.join(path, ERROR_FILE), {
            "message": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            "traceback": traceback.format_exc()})
    return ctx.result(run)


def _train(ctx: Ctx, run: Run, overwrite: bool, log, progress: bool = False) -> None:
    from largebatch.train.loop import train

    cfg = ctx.resolved(run)
    cfg.progress = progress
    if overwrite:
        cfg.overwrite = True
    else:
        cfg.resume = os.path.isdir(cfg.out_dir)  # also restarts a run stopped in its first epoch
    res = ctx.result(run)
    if run.kind == "pretrain":
        from largebatch.train.linear_eval import linear_eval
        from largebatch.train.pretrain import BarlowTwinsTask

        if not (res.history and res.history[-1]["epoch"] >= cfg.epochs):
            if train(cfg, _dataset(cfg), log=log, task=BarlowTwinsTask()).status != "finished":
                return
        linear_eval(cfg.out_dir, epochs=run.linear_epochs, log=log)
        return
    train(cfg, _dataset(cfg), log=log, task=run.task() if run.task else None)


def select(runs: list[Run], only: str | None) -> list[Run]:
    """The runs whose names match one of the comma-separated shell patterns ``only``."""
    if not only:
        return runs
    pats = [p for p in only.split(",") if p]
    out = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]
    if not out:
        raise UserError(f"--only {only}: matches none of the {len(runs)} runs (e.g. {runs[0].name})" if runs
                        else f"--only {only}: this artifact has no runs")
    return out


def validate(ctx: Ctx, runs: list[Run]) -> list[Run]:
    """``runs``, after checking every configuration (``UserError`` naming the first invalid run)."""
    for r in runs:
        if r.kind != "call":
            ctx.resolved(r)
    return runs


def run_all(ctx: Ctx, only: str | None = None, retry_failed: bool = False, log=print, verbose: bool = False) -> list[Result]:
    """Run the missing and partial runs of the grid (and of grids that grow from results) in order."""
    if ctx.artifact.prepare is not None:
        ctx.artifact.prepare(ctx)
    done: set[str] = set()
    while True:
        runs = validate(ctx, select(ctx.grid(), only))  # every configuration is valid before anything runs
        todo = [r for r in runs if r.name not in done]
        if not todo:
            return [ctx.result(r) for r in runs]
        with _runs_bar(ctx, todo, verbose) as bar:
            say = log if bar.disable else bar.write  # lines above the bars, in a terminal
            for i, r in enumerate(todo, 1):
                done.add(r.name)
                before = ctx.result(r)
                if before.status == "finished":
                    bar.update()
                    continue
                if before.status == "failed" and not retry_failed:
                    say(f"[{i}/{len(todo)}] {r.name}: failed earlier, kept ({before.error}); --retry-failed runs it "
                        f"again")
                    bar.update()
                    continue
                what = {"partial": "resuming", "failed": "retrying"}.get(before.status, "starting")
                say(f"[{i}/{len(todo)}] {r.name}: {what}")
                bar.set_postfix_str(r.name)
                after = execute(ctx, r, retry_failed, log, verbose, progress=not bar.disable)
                say(f"[{i}/{len(todo)}] {r.name}: {describe(after)}")
                bar.update()


def _runs_bar(ctx: Ctx, todo: list[Run], verbose: bool):
    """The progress bar over an artifact's runs (in a terminal, unless ``verbose`` prints every
    epoch); each training run draws its own bar of steps below it."""
    import sys

    from tqdm import tqdm

    return tqdm(total=len(todo), unit="run", desc=f"{ctx.artifact.id} {ctx.scale}", file=sys.stderr,
                disable=True if verbose else None, dynamic_ncols=True)


def describe(res: Result) -> str:
    if res.status == "failed":
        return f"FAILED: {res.error}"
    if res.status == "partial":
        return f"stopped after epoch {res.final.get('epoch', 0)}; --run resumes it"
    if res.run.kind == "call" or res.status != "finished":
        return res.status
    if res.run.kind == "pretrain":
        return f"finished, linear-eval top-1 {100 * res.value.get('top1', math.nan):.2f}%"
    acc = res.final.get("test_acc")
    return "finished" + (f", test acc {100 * acc:.2f}%" if isinstance(acc, (int, float)) else "")


# ----------------------------------------------------------------------------- collecting
def collect(ctx: Ctx, only: str | None = None, command: str = "") -> str:
    """Tabulate and draw the artifact; write ``results.md`` in its folder; return the Markdown."""
    runs = validate(ctx, select(ctx.grid(), only))
    results = [ctx.result(r) for r in runs]
    os.makedirs(ctx.root, exist_ok=True)
    body = ctx.artifact.collect(ctx, results)
    counts = {s: sum(r.status == s for r in results) for s in ("finished", "partial", "failed", "missing")}
    head = [f"# `{ctx.artifact.id}`: {ctx.artifact.title}", "",
            f"**Question.** {ctx.artifact.question}", "",
            f"**Scale `{ctx.scale}`.** {ctx.artifact.scales[ctx.scale]}", "",
            f"**Seeds** {', '.join(map(str, ctx.seeds)) or '-'}; **runs** {len(results)}: "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f". Training time of these runs: "
            f"{train_hours(results):.2f} h (the sum of their epoch times; one thread each: CPU-hours).", "",
            f"**Stamp.** {stamp(ctx)}", ""]
    if command:
        head += [f"**Command.** `{command}`", ""]
    tail = []
    bad = [r for r in results if r.status in ("failed", "partial", "missing")]
    if bad:
        tail += ["", "Runs not in the numbers above:", ""]
        tail += [f"- `{r.run.name}`: {r.status}" + (f" ({r.error})" if r.error else "") for r in bad[:50]]
        if len(bad) > 50:
            tail.append(f"- ... and {len(bad) - 50} more")
    text = "\n".join(head) + "\n" + body.rstrip() + "\n" + "\n".join(tail) + "\n"
    with open(os.path.join(ctx.root, "results.md"), "w") as f:
        f.write(text)
    return text


def train_hours(results: list[Result]) -> float:
    """Hours the runs spent training: the sum of ``epoch_seconds`` over their metrics rows."""
    return sum(float(h.get("epoch_seconds") or 0.0) for r in results for h in r.history) / 3600.0


def stamp(ctx: Ctx | None = None) -> str:
    """Commit, CPU model (and cores), torch version, date and seeds: printed with every collected table."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_model()} x {os.cpu_count()} cores"
    seeds = f"; seeds {','.join(map(str, ctx.seeds)) or '-'}" if ctx is not None else ""
    ran = run_commits(ctx) if ctx is not None else {}
    here = commit()
    runs = "" if not ran or set(ran) == {here} else "; runs started at " + ", ".join(
        f"{c} ({n})" for c, n in sorted(ran.items(), key=lambda kv: -kv[1]))
    return (f"commit {here}{' (collected)' if runs else ''}{runs}; {dev}; torch {torch.__version__}; "
            f"{datetime.now():%Y-%m-%d %H:%M}{seeds}")


def run_commits(ctx: Ctx) -> dict[str, int]:
    """How many of the artifact's existing training runs each commit started (the ``commit`` of
    their ``.largebatch-run`` marker; ``not recorded`` for runs of versions before it)."""
    out: dict[str, int] = {}
    for r in ctx.grid():
        if r.kind == "call":
            continue
        try:
            with open(os.path.join(ctx.path(r), ".largebatch-run")) as f:
                c = json.load(f).get("commit") or "not recorded"
        except (OSError, ValueError, AttributeError):
            continue
        out[c] = out.get(c, 0) + 1
    return out


def machine() -> str:
    import torch

    n = torch.get_num_threads()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {n} thread{'s' if n > 1 else ''}"
    return f"{platform.node() or 'this machine'} ({platform.machine()}, {dev}, torch {torch.__version__})"


# ----------------------------------------------------------------------------- collect helpers
def where(results: list[Result], **tags) -> list[Result]:
    """The results whose tags have these values."""
    return [r for r in results if all(r.run.tags.get(k) == v for k, v in tags.items())]


def values(results: list[Result], fn: Callable[[Result], float]) -> list[float]:
    """``fn`` of the finished results (non-finite values dropped)."""
    out = [fn(r) for r in results if r.status == "finished"]
    return [v for v in out if v is not None and math.isfinite(v)]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], spec: str = ".2f") -> str:
    """``mean ± std`` of ``xs`` (just the value for one)."""
    m, s = mean_std(xs)
    return f"{m:{spec}}" + (f" ± {s:{spec}}" if len(xs) > 1 else "")


def cell(results: list[Result], fn: Callable[[Result], float], digits: int = 2) -> str:
    """``mean ± std`` of ``fn`` over the finished runs, saying how many of the runs are not in it
    (failed, unfinished, missing) instead of failing."""
    xs = values(results, fn)
    others = {s: sum(r.status == s for r in results) for s in ("failed", "partial", "missing")}
    nonfinite = sum(r.status == "finished" for r in results) - len(xs)
    note = ", ".join(f"{n} {'unfinished' if s == 'partial' else s}" for s, n in others.items() if n)
    note = ", ".join(x for x in (note, f"{nonfinite} non-finite" if nonfinite else "") if x)
    if not xs:
        return f"- ({note})" if note else "-"
    return fmt(xs, f".{digits}f") + (f" ({len(xs)}/{len(results)}; {note})" if note else "")


def test_acc(r: Result) -> float:
    return 100.0 * r.final["test_acc"]


def best_test_acc(r: Result) -> float:
    return 100.0 * max(h["test_acc"] for h in r.history)


def linear_top1(r: Result) -> float:
    return 100.0 * r.value["top1"] if "top1" in r.value else math.nan


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def paper(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def curve(results: list[Result], key: str, scale: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, std) of the metric ``key`` over the finished runs, epoch by epoch."""
    rows = [r.history for r in results if r.status == "finished"]
    if not rows:
        return [], [], []
    n = min(len(h) for h in rows)
    ep, mu, sd = [], [], []
    for i in range(n):
        xs = [scale * h[i][key] for h in rows if isinstance(h[i].get(key), (int, float))]
        if xs:
            m, s = mean_std(xs)
            ep.append(rows[0][i]["epoch"])
            mu.append(m)
            sd.append(s)
    return ep, mu, sd


def plot_curve(ax, results: list[Result], key: str, label: str, scale: float = 1.0, **kw) -> None:
    """Mean curve of ``key`` over seeds, with a ± std band."""
    ep, mu, sd = curve(results, key, scale)
    if not ep:
        return
    (line,) = ax.plot(ep, mu, label=label, **kw)
    if any(sd):
        ax.fill_between(ep, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def legend(ax, **kw) -> None:
    """``ax.legend`` when something was drawn (a grid without results draws nothing)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def save(ctx: Ctx, fig, name: str) -> str:
    """Write the figure under the artifact's folder; returns the Markdown line that shows it."""
    from largebatch.plotting import save_figure

    save_figure(fig, ctx.figure(name))
    return f"![{name}]({name})"
