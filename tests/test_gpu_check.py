"""``benchmarks/gpu_check.py`` (``make gpu-check``) on a machine without a GPU: its refusal, its
dry run (every stage's CPU-checkable part) and the invariant its ``pytest -k cuda`` relies on."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_every_cuda_only_test_is_selected_by_k_cuda():
    """A test skipped without CUDA must have ``cuda`` in its name: the check runs ``pytest -k cuda``."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                marks = " ".join(ast.unparse(d) for d in node.decorator_list)
                if "skipif" in marks and "cuda.is_available" in marks:
                    found.append((path.name, node.name))
    assert len(found) >= 3, found  # graph capture, no sync (default path, GradScaler)
    assert [f for f in found if "cuda" not in f[1]] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_one_line_and_exit_status_2(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "no CUDA device" in p.stderr
    assert not (tmp_path / "r.md").exists()


def test_dry_run_report_lists_every_stage(tmp_path, capsys):
    gc = _module()
    assert sum(s.limit_s for s in gc.STAGES) <= gc.TOTAL_LIMIT_S - 30  # start-up and report inside 8 minutes
    assert gc.TOTAL_LIMIT_S <= 8 * 60
    out = tmp_path / "report.md"
    rc = gc.main(["--dry-run", "--out", str(out), "--tests", str(ROOT / "tests" / "test_fast_paths.py")])
    text = out.read_text()
    assert rc == 0, text
    names = ["cuda-tests", "step-benchmark", "cuda-graph", "no-sync", "amp-training"]
    assert [s.name for s in gc.STAGES] == names
    for name in names:
        assert f"| `{name}` |" in text and f"## {name}" in text
    assert text.count("| ok (dry run) |") == len(names)
    assert "test_cuda_default_path_never_synchronizes[LARS]" in text  # collected, not run
    assert "--device" in text and "--sets" in text                   # the benchmark's arguments exist
    assert '"dry_run": true' in text
    assert "5/5 stages ok" in capsys.readouterr().out
