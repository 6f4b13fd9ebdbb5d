import os

import pytest
import torch

# Deterministic, modest threading: CI has 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The compiled path's measured kernel choices and the native library (optim/_compiled.py,
# optim/_native.py) go to a folder of this test session, not to the user's ~/.cache/largebatch;
# the session removes it when it ends (pytest_unconfigure).
_SESSION_CACHE = None
if "LARGEBATCH_CACHE_DIR" not in os.environ:
    import tempfile

    _SESSION_CACHE = os.environ["LARGEBATCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="largebatch-test-cache-")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None and os.environ.get("LARGEBATCH_CACHE_DIR") == _SESSION_CACHE:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
        del os.environ["LARGEBATCH_CACHE_DIR"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and robust when the 2 cores are shared.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kernel_sized(monkeypatch):
    """Let tiny test tensors go through the compiled optimizer kernel (optim/_compiled.py)."""
    from largebatch.optim import _compiled

    monkeypatch.setattr(_compiled, "MIN_NUMEL", 64)
    monkeypatch.setattr(_compiled, "MIN_TOTAL", 64)


def pytest_collection_modifyitems(config, items):
    """The known failures of the optimizer table (``cases.OptimInfo.known``): a test
    parametrized by a row's ``name`` and the failure's parameter values is marked xfail and
    not run."""
    import sys

    cases = sys.modules.get("cases")   # imported by the modules that run over the table
    if cases is None:
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        row = cases.TABLE.get(params.get("name")) if isinstance(params.get("name"), str) else None
        for known in row.known if row is not None else ():
            if known.test == item.originalname and all(params.get(k, object()) == v for k, v in known.params.items()):
                item.add_marker(pytest.mark.xfail(reason=known.reason, run=False))
