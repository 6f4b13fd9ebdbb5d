"""The package's layers import one way (a fresh interpreter per check): the shared modules
(``models``, ``_norms``, ``_dtensor``) import no other part of the package, ``persample`` does not
import ``optim`` (``optim.clars`` imports ``persample``) and ``ssl`` does not import ``train``
(the harness imports ``ssl``)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = {"largebatch", "largebatch._validation", "largebatch._norms"}


def loaded_by(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('largebatch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module, allowed", [
    ("largebatch.models", SHARED | {"largebatch.models"}),
    ("largebatch._dtensor", SHARED | {"largebatch._dtensor"}),
    ("largebatch._norms", SHARED),
])
def test_shared_modules_import_nothing_above_them(module, allowed):
    assert loaded_by(module) <= allowed


def imports_of(package: str) -> set[str]:
    """Every module the source files of ``package`` import, at the top or inside a function
    (a lazy import is still a dependency), as absolute names."""
    import largebatch
    root = Path(largebatch.__file__).parent
    base = root.joinpath(*package.split(".")[1:])
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    found = set()
    for f in files:
        here = ".".join(("largebatch",) + f.relative_to(root).with_suffix("").parts)
        pkg = here.removesuffix(".__init__") if f.name == "__init__.py" else here.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("largebatch.persample", "largebatch.optim"),
    ("largebatch.ssl", "largebatch.train"),
    ("largebatch.models", "largebatch.train"),
    ("largebatch._dtensor", "largebatch.optim"),
    ("largebatch._norms", "largebatch.optim"),
])
def test_lower_layers_do_not_import_higher_ones(package, forbidden):
    """Checked in the source, lazy imports included: the layers form no cycle."""
    bad = {m for m in imports_of(package) if m == forbidden or m.startswith(forbidden + ".")}
    assert not bad, f"{package} imports {sorted(bad)}"
