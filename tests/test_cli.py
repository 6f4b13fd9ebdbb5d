"""The command line's surface and the package's metadata: building the parser imports nothing
heavy (so ``--help`` answers at once; benchmarks/cli_startup.py measures the time), help texts
are clean, ``--version`` and the packaging files agree."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from largebatch import __version__
from largebatch.cli import COMMANDS, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
HEAVY = ("torch", "torchvision", "scipy", "sklearn", "matplotlib")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                out[name] = p
                out.update({f"{name} {k}": v for k, v in _subparsers(p).items()})
    return out


def test_building_the_parser_and_every_help_imports_no_heavy_module():
    """`largebatch --help` and every sub-command's --help must not import torch & co."""
    code = (
        "import sys, argparse\n"
        "import largebatch.cli as cli\n"
        "p = cli.build_parser()\n"
        "p.format_help()\n"
        "for a in p._actions:\n"
        "    if isinstance(a, argparse._SubParsersAction):\n"
        "        for sp in a.choices.values():\n"
        "            sp.format_help()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"building the parser imported {out.stdout.strip()}"


def test_every_command_module_is_listed_and_has_the_protocol():
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(COMMANDS) <= set(subs)
    for name, (module, _) in COMMANDS.items():
        mod = __import__(module, fromlist=["run"])
        assert callable(mod.add_arguments) and callable(mod.run), module


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"largebatch {__version__}"


def test_version_is_written_once():
    """pyproject.toml reads the version from largebatch.__version__ (no second copy)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "largebatch.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)


def test_packaging_files():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert project["license"] == "Apache-2.0" and "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer
    assert os.path.isfile(os.path.join(SRC, "largebatch", "py.typed"))
    assert project["authors"] and len(project["classifiers"]) >= 5
    # the default commands' needs are dependencies (digits comes from scikit-learn)
    deps = " ".join(project["dependencies"])
    assert "scikit-learn" in deps and "scipy" in deps


def test_package_index_description_is_self_contained():
    """The long description has no links or images relative to the repository (they break on
    the package index), and its code example runs."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        readme = tomllib.load(f)["project"]["readme"]
    with open(os.path.join(ROOT, readme["file"])) as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)]+)\)", text) + re.findall(r"<img[^>]+src=\"([^\"]+)\"", text)
    assert all(re.match(r"https?://", t) for t in targets), targets
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert code
    exec(compile(code[0], "docs/pypi.md", "exec"), {})


def test_help_texts_state_each_default_once_and_name_papers():
    """No "(default: X) (default: None)"; papers are named (TVLARS, LALC, CLARS paper), not by
    an internal "seed 00N" number that reads like a random seed."""
    for name, p in _subparsers(build_parser()).items():
        for action in p._actions:
            h = action.help or ""
            assert h.count("(default") <= 1, f"{name} {action.option_strings}: {h}"
            assert "(default: None)" not in h, f"{name} {action.option_strings}: {h}"
        assert not re.search(r"seed 00\d", p.format_help()), name
        assert not re.search(r"seed 00\d", p.description or ""), name


def test_optimizers_lists_the_defaults_of_train(capsys):
    """`largebatch optimizers` shows what `train` passes (SGD: momentum 0.9, the flag's default),
    and the class's own default beside it where that differs."""
    assert main(["optimizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    flags = {lines[i].split()[0]: lines[i + 1] for i in range(len(lines) - 1) if "flags:" in lines[i + 1]}
    assert "--momentum 0.9 (class default 0)" in flags["sgd"]
    assert "--momentum 0.9," in flags["lars"] and "--eta 0.001" in flags["lars"]


def test_groups_unknown_model_is_one_line(capsys):
    assert main(["groups", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_model" in err


def test_package_warnings_print_as_one_line(monkeypatch):
    """A missing compiler's warning on the command line: one line, no library source line, the
    compiler's multi-line text cut, what happens instead kept."""
    import warnings

    from largebatch import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    msg = ("largebatch: the compiled optimizer path is unavailable (InductorError: InvalidCxxCompiler: No working "
           "C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n); using the 'foreach' path")
    out = cli.format_warning(RuntimeWarning(msg), RuntimeWarning, "/x/_engine.py", 371, "fin = self._run(...)")
    assert out.count("\n") == 1 and "_engine.py" not in out and "TORCHDYNAMO" not in out
    assert out.startswith("largebatch: the compiled optimizer path is unavailable") and "using the 'foreach' path" in out
    other = cli.format_warning(UserWarning("not ours"), UserWarning, "/y/z.py", 3, "code()")
    assert "z.py:3" in other  # other warnings keep Python's format
    assert main(["optimizers", "--markdown"]) == 0
    assert warnings.formatwarning is cli.format_warning


def test_test_session_removes_its_cache_folder(tmp_path):
    """tests/conftest.py's temporary native/kernel cache is gone after a pytest session."""
    (tmp_path / "test_touch.py").write_text(
        "import os\n"
        "def test_touch():\n"
        "    d = os.environ['LARGEBATCH_CACHE_DIR']\n"
        "    open(os.path.join(d, 'marker'), 'w').close()\n"
        "    print('CACHE=' + d)\n")
    import shutil

    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "LARGEBATCH_CACHE_DIR"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    cache = next(line.split("=", 1)[1] for line in out.stdout.splitlines() if "CACHE=" in line)
    cache = cache[cache.index("/"):].strip()
    assert "largebatch-test-cache-" in cache and not os.path.exists(cache)
