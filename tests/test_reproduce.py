"""`largebatch reproduce`: every artifact of the catalogue lists, runs its smoke edition, collects a table
with the paper's numbers and draws its figure; runs resume after a stop and are never redone; failed and
missing runs are reported in the table instead of failing; user errors are one line and exit 2."""

import os
import shlex

import pytest

from largebatch.cli import build_parser, main
from largebatch.experiments import engine
from largebatch.experiments.artifacts import ARTIFACTS
from largebatch.experiments.reproduce import context
from largebatch.train.rundir import read_table

pytestmark = pytest.mark.usefixtures("one_thread")

#: every artifact id of the catalogue (../shared/EXPERIMENTS.md), the fair-baselines comparison and the
#: batch-scaling study
CATALOGUE = ("tvlars-table1", "tvlars-fig1", "tvlars-fig2", "tvlars-fig3", "tvlars-ablation-lambda",
             "tvlars-ablation-lr", "tvlars-ablation-init", "lalc-fig1", "lalc-fig3", "lalc-table2", "lalc-fig5",
             "clars-fig1", "clars-fig2", "clars-fig3", "clars-table1", "fair-baselines", "warmup-control",
             "batch-scaling")
#: a number of the paper each collected table must show (figure-only artifacts: their figure's claim)
PAPER_MARK = {"tvlars-table1": "(74.64)", "tvlars-ablation-lr": "(78.92)", "lalc-table2": "(94.97)",
              "clars-table1": "75.3", "tvlars-fig1": "3-5 points", "tvlars-fig2": "Fig. 2",
              "tvlars-fig3": "eq. 9", "tvlars-ablation-lambda": "84%", "tvlars-ablation-init": "1-3 points",
              "lalc-fig1": "1.4669", "lalc-fig3": "Fig. 3", "lalc-fig5": "Fig. 5", "clars-fig1": "Fig. 1",
              "clars-fig2": "Fig. 2", "clars-fig3": "Fig. 3", "fair-baselines": "trials per optimizer",
              "warmup-control": "(the positive control)", "batch-scaling": "(S/S_min - 1)(E/E_min - 1) = 1"}


def _run(argv, capsys):
    """(exit code, stdout, stderr) of ``largebatch ARGV`` (argparse's exit too)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_every_artifact_of_the_catalogue_with_its_scales(capsys):
    assert set(ARTIFACTS) == set(CATALOGUE)
    rc, out, _ = _run(["reproduce", "--list"], capsys)
    assert rc == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(CATALOGUE)
    for art in CATALOGUE:
        for scale in ARTIFACTS[art].scales:
            assert f"{scale} " in rows[art]
    assert "mini" not in rows["lalc-fig5"].split("LALC")[0]  # ImageNet only: paper and smoke
    rc, out, _ = _run(["reproduce", "clars-fig2", "--list", "--scale", "smoke"], capsys)
    assert rc == 0 and "question:" in out and "fcn5-digits-s0" in out and "missing" in out


@pytest.mark.parametrize("art", CATALOGUE)
def test_every_run_at_every_scale_is_a_valid_configuration(art, tmp_path):
    a = ARTIFACTS[art]
    for scale in a.scales:
        ctx = context(a, scale, None, str(tmp_path), {})
        runs = ctx.grid()
        assert len({ctx.path(r) for r in runs}) == len(runs)
        for r in runs:
            if r.kind != "call":
                cfg = ctx.resolved(r)
                assert cfg.out_dir == ctx.path(r) and cfg.seed == r.tags.get("seed", cfg.seed)
            assert ctx.result(r).status == "missing"
    assert bool(a.missing) == (len(a.scales) < 3)


def test_printed_commands_are_the_runs_configurations(tmp_path, capsys):
    from largebatch.train.cli import config_from_args
    from largebatch.train.config import TrainConfig

    rc, out, err = _run(["reproduce", "lalc-table2", "--scale", "mini", "--out", str(tmp_path)], capsys)
    assert rc == 0 and "180 runs (180 missing)" in err
    ctx = context(ARTIFACTS["lalc-table2"], "mini", None, str(tmp_path), {})
    lines = out.splitlines()
    assert len(lines) == 180
    for line, run in zip(lines, ctx.grid()):
        argv = shlex.split(line)
        assert argv[:2] == ["largebatch", "train"] and argv[-1] == "--resume"
        parsed = config_from_args(build_parser().parse_args(argv[1:]), TrainConfig).to_dict()
        assert {**parsed, "resume": False} == ctx.resolved(run).to_dict()
    # runs that need this package's Python (custom tasks, analyses) are launched through reproduce --only
    rc, out, _ = _run(["reproduce", "clars-fig3", "--scale", "smoke", "--out", str(tmp_path), "--set", "epochs=4"], capsys)
    freeze = [x for x in out.splitlines() if "--only fc-s0" in x]
    assert len(freeze) == 1 and freeze[0].startswith("largebatch reproduce clars-fig3 --scale smoke") \
        and "--set epochs=4" in freeze[0] and "--epochs 4" in out
    rc, out, _ = _run(["reproduce", "tvlars-table1", "--scale", "smoke", "--out", str(tmp_path), "--only", "bt-*lars*"], capsys)
    assert out.count(" && largebatch linear-eval ") == 2 and out.startswith("largebatch pretrain ")


@pytest.mark.parametrize("art", CATALOGUE)
def test_smoke_edition_runs_collects_and_draws(art, tmp_path, capsys):
    argv = ["reproduce", art, "--scale", "smoke", "--out", str(tmp_path)]
    rc, out, err = _run(argv + ["--run"], capsys)
    assert rc == 0, err
    root = tmp_path / art / "smoke"
    report = (root / "results.md").read_text()
    ctx = context(ARTIFACTS[art], "smoke", None, str(tmp_path), {})
    n = len(ctx.grid())
    assert (f"**runs** {n}: {n} finished." in report) if n else "**runs** 0" in report
    assert "failed" not in report and "missing" not in report and PAPER_MARK[art] in report
    figures = [line.split("(")[1].rstrip(")").split(")")[0] for line in report.splitlines() if line.startswith("![")]
    assert figures
    for f in figures:
        assert (root / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (root / f).stat().st_size > 5000
    # a finished run is never redone
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("checkpoint.pt")}
    rc, out, _ = _run(argv + ["--run"], capsys)
    assert rc == 0 and "starting" not in out and "resuming" not in out
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("checkpoint.pt")}


def test_resume_after_a_stop_continues_the_runs(tmp_path, capsys):
    argv = ["reproduce", "tvlars-ablation-init", "--scale", "smoke", "--out", str(tmp_path)]
    rc, out, _ = _run(argv + ["--run", "--set", "stop_after_epochs=1"], capsys)
    assert rc == 0 and out.count("stopped after epoch 1; --run resumes it") == 4
    assert "**runs** 4: 4 partial." in out and "- (1 unfinished)" in out
    dirs = sorted(p.parent for p in tmp_path.rglob("metrics.csv"))
    first = {d: read_table(str(d / "metrics.csv")) for d in dirs}
    assert len(dirs) == 4 and all(len(rows) == 1 for rows in first.values())
    rc, out, _ = _run(argv + ["--run"], capsys)
    assert rc == 0 and out.count(": resuming") == 4 and "**runs** 4: 4 finished." in out
    for d in dirs:
        rows = read_table(str(d / "metrics.csv"))
        assert len(rows) == 2 and rows[0] == first[d][0]  # epoch 1 kept, not trained again


def test_failed_runs_are_reported_kept_and_retried_only_when_asked(tmp_path, capsys, monkeypatch):
    import largebatch.train.loop as loop

    argv = ["reproduce", "clars-fig1", "--scale", "smoke", "--out", str(tmp_path)]
    real = loop.train

    def flaky(cfg, *a, **k):
        if cfg.out_dir.endswith("lars-b512-s0"):
            raise RuntimeError("disk on fire")
        return real(cfg, *a, **k)

    monkeypatch.setattr(loop, "train", flaky)
    # a non-finite run (an absurd LR) and a run stopped by an exception
    rc, out, _ = _run(argv + ["--run", "--only", "mnag-b128-s0", "--set", "lr=1e30"], capsys)
    assert rc == 0 and "FAILED: non-finite training loss" in out
    rc, out, _ = _run(argv + ["--run"], capsys)
    assert rc == 0 and "failed earlier, kept" in out and "FAILED: RuntimeError: disk on fire" in out
    assert "**runs** 4: 2 finished, 2 failed." in out
    assert "| 128 | - (1 failed) | - (1 failed) |" in out and "| 512 |" in out
    assert "`lars-b512-s0`: failed (RuntimeError: disk on fire)" in out
    assert (tmp_path / "clars-fig1" / "smoke" / "fig1.png").exists()
    monkeypatch.setattr(loop, "train", real)
    rc, out, _ = _run(argv + ["--run"], capsys)
    assert rc == 0 and out.count("failed earlier, kept") == 2 and "2 failed" in out
    rc, out, _ = _run(argv + ["--run", "--retry-failed"], capsys)
    assert rc == 0 and out.count(": retrying") == 2 and "**runs** 4: 4 finished." in out


@pytest.mark.parametrize("art", CATALOGUE)
def test_collect_before_any_run_says_what_is_missing(art, tmp_path, capsys):
    rc, out, err = _run(["reproduce", art, "--scale", "smoke", "--out", str(tmp_path), "--collect"], capsys)
    assert rc == 0, err
    n = len(context(ARTIFACTS[art], "smoke", None, str(tmp_path), {}).grid())
    assert f"{n} missing" in out if n else "**runs** 0" in out


def test_partial_grid_collects_with_the_missing_cells_marked(tmp_path, capsys):
    argv = ["reproduce", "lalc-table2", "--scale", "smoke", "--out", str(tmp_path)]
    assert _run(argv + ["--run", "--only", "lalc*"], capsys)[0] == 0
    rc, out, _ = _run(argv + ["--collect"], capsys)
    assert rc == 0 and "**runs** 9: 3 finished, 6 missing." in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "- (1 missing) (94.97)" in rows["SGD"] and "missing" not in rows["LALC"] and "(95.30)" in rows["LALC"]


@pytest.mark.parametrize("argv,says", [
    (["reproduce"], "name an artifact"),
    (["reproduce", "tvlars-tabel1"], "did you mean tvlars-table1"),
    (["reproduce", "lalc-fig5", "--scale", "mini"], "lalc-fig5 has no mini scale"),
    (["reproduce", "fair-baselines", "--scale", "paper"], "no paper edition"),
    (["reproduce", "tvlars-table1", "--set", "epoch=3"], "FIELD=VALUE"),
    (["reproduce", "tvlars-table1", "--scale", "paper", "--set", "epochs=7"],
     "cifar10-lars-b512-lr1-s0: invalid configuration: warmup_epochs"),
    (["reproduce", "lalc-table2", "--scale", "smoke", "--only", "adam*"], "--only adam*: matches none"),
    (["reproduce", "lalc-table2", "--scale", "smoke", "--seeds", "0"], "expected an integer >= 1"),
    (["reproduce", "lalc-table2", "--scale", "paper", "--run", "--only", "sgd-b128-s0", "--set", "data_dir=/nowhere"],
     "cifar10: not found"),
])
def test_user_errors_are_one_line_and_exit_2(argv, says, capsys, tmp_path):
    rc, out, err = _run(argv + ["--out", str(tmp_path)], capsys)
    assert rc == 2 and says in err
    if "usage" not in err:
        assert err.count("\n") == 1 and err.startswith("largebatch reproduce: ")


def test_old_command_is_an_alias_at_paper_scale(capsys, tmp_path):
    rc, out, _ = _run(["reproduce-tvlars-table1", "--datasets", "cifar10", "--batch-sizes", "512", "--out",
                       str(tmp_path)], capsys)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 9 and all(x.startswith("largebatch train --dataset cifar10 --model resnet18")
                                               for x in lines)
    assert all("--epochs 100" in x and "tvlars-table1/paper/" in x for x in lines)
    rc, out, _ = _run(["reproduce-tvlars-table1", "--problems", "ssl", "--optimizers", "tvlars", "--out",
                       str(tmp_path)], capsys)
    assert rc == 0 and out.count("largebatch pretrain ") == 36 and "--tvlars-lam 1e-05" in out
    rc, _, err = _run(["reproduce-tvlars-table1", "--batch-sizes", "500"], capsys)
    assert rc == 2 and "--batch-sizes: invalid choice 500" in err


def test_cell_reports_mean_std_and_what_is_left_out():
    def res(status, acc=None):
        return engine.Result(engine.Run("r"), status, "p", [{"epoch": 1, "test_acc": acc}] if acc is not None else [])

    assert engine.cell([res("finished", 0.5), res("finished", 0.7)], engine.test_acc) == "60.00 ± 14.14"
    assert engine.cell([res("finished", 0.5)], engine.test_acc) == "50.00"
    assert engine.cell([res("finished", 0.5), res("failed"), res("missing")], engine.test_acc) == \
        "50.00 (1/3; 1 failed, 1 missing)"
    assert engine.cell([res("partial"), res("finished", float("nan"))], engine.test_acc) == "- (1 unfinished, 1 non-finite)"
    assert engine.cell([], engine.test_acc) == "-"


def test_run_in_a_terminal_draws_a_bar_over_runs_and_one_per_run(tmp_path, capsys, monkeypatch):
    """`reproduce --run` in a terminal: a bar over the artifact's runs and each run's bar of steps
    (outside a terminal, as in the other tests, both stay quiet)."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    argv = ["reproduce", "tvlars-ablation-init", "--scale", "smoke", "--out", str(tmp_path), "--run",
            "--only", "*lars-b512-lr2-initxavier_uniform-s0"]
    assert main(argv) == 0
    text = term.getvalue()
    assert "tvlars-ablation-init smoke" in text and "2/2" in text and "run" in text  # the bar over runs
    assert "it/s" in text or "s/it" in text  # a run's bar of steps


def test_the_stamp_names_the_commits_that_started_the_runs(tmp_path, capsys, monkeypatch):
    """Each run's marker records the commit that started it; a table collected by another
    commit says which commits its runs started at (numbers of older code are not passed off as
    the collector's)."""
    import json

    from largebatch._provenance import commit
    from largebatch.experiments import engine

    argv = ["reproduce", "tvlars-ablation-init", "--scale", "smoke", "--out", str(tmp_path)]
    assert _run(argv + ["--run"], capsys)[0] == 0
    markers = sorted(tmp_path.rglob(".largebatch-run"))
    assert len(markers) == 4 and {json.loads(m.read_text())["commit"] for m in markers} == {commit()}
    ctx = context(ARTIFACTS["tvlars-ablation-init"], "smoke", None, str(tmp_path), {})
    assert "runs started at" not in engine.stamp(ctx)           # collected by the commit that ran them
    old = json.loads(markers[0].read_text())
    markers[0].write_text(json.dumps({**old, "commit": "0123456789"}))
    m = json.loads(markers[1].read_text())
    del m["commit"]                                              # a run of a version before the field
    markers[1].write_text(json.dumps(m))
    got = engine.stamp(ctx)
    assert f"commit {commit()} (collected); runs started at {commit()} (2)" in got
    assert "0123456789 (1)" in got and "not recorded (1)" in got
