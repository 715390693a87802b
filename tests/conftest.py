import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter; the flag must be set before triton is
# first imported (its own library functions are decorated at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparkkv  # noqa: E402,F401  (registers the "sparkkv" attention)

# SPARKKV_TEST_BACKEND=torch|cpu|triton runs the suite with that attention backend wherever a
# configuration says "auto" (the default), so the whole suite can go through each backend.
TEST_BACKEND = os.environ.get("SPARKKV_TEST_BACKEND")

ROOT = Path(__file__).resolve().parents[1]
# Optional real data (essays, WikiText-2, a tiny checkpoint): the folder SPARKKV_DATA names (the
# development workspace keeps one beside the checkout, the default); tests that read it skip without it.
SHARED_DATA = Path(os.environ.get("SPARKKV_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def seed(request):
    """A fresh seed per test run (set SPARKKV_TEST_SEED to replay one); printed on failure."""
    value = int(os.environ.get("SPARKKV_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"replay with SPARKKV_TEST_SEED={value}"))


@pytest.fixture(autouse=True)
def _test_backend(monkeypatch):
    """Route the attention backend "auto" to SPARKKV_TEST_BACKEND (the compression kernel is chosen
    by device and dtype, not by the attention backend)."""
    if not TEST_BACKEND:
        yield
        return
    import sparkkv.ops as ops

    backend = ops.backend
    monkeypatch.setattr(ops, "backend", lambda name, device: backend(TEST_BACKEND if name == "auto" else name, device))
    yield
