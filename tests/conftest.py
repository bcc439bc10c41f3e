"""Test set-up: the device under test, Triton's interpreter on machines without a GPU, seeds and tolerances.

``FASTDISTILL_TEST_DEVICE=cuda`` runs the suite's device-parametrized tests on the GPU (``make gpu-check``); without
CUDA the Triton kernels run under ``TRITON_INTERPRET=1`` at small sizes, so the GPU code is still exercised.

Randomized tests take the ``seed`` fixture: a seed derived from the test's own id (``zlib.crc32`` of the node id), so
a failure reproduces by re-running that id, and it is printed in the failure report. ``FASTDISTILL_STRESS_SEEDS=N``
(``make test-stress``) runs every test marked ``stress`` N times, ids ``...-seed0`` to ``...-seed{N-1}``, each with
its own seed.

Accuracy is judged against a float64 reference with one rule for every dtype (STYLE.md): the error of the result is
at most ``TORCH_ERROR_FACTOR`` times the error of plain eager torch computing the same thing in the same dtype
(``assert_within_torch_error``).
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (fastdistill.kernels is imported lazily by the ops)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402

warnings.filterwarnings("ignore", message="fastdistill._C is not available")

DEVICE = torch.device(os.environ.get("FASTDISTILL_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
STRESS_SEEDS = int(os.environ.get("FASTDISTILL_STRESS_SEEDS", "0") or 0)

# The one tolerance factor of the suite: a fastdistill result may be at most this many times further from the float64
# reference than plain torch (the eager formula, autograd) is in the same dtype on the same inputs.
TORCH_ERROR_FACTOR = 2.0


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: runs only on the CPU (skipped by make gpu-check)")
    config.addinivalue_line("markers", "slow: long-running (multi-process, real models)")
    config.addinivalue_line("markers", "launched: starts deepspeed-launched processes (tests/_launch.py)")
    config.addinivalue_line(
        "markers", "stress: randomized correctness test repeated over FASTDISTILL_STRESS_SEEDS seeds (make test-stress)"
    )


# ------------------------------------------------------------------------------------------------------------ seeds
def seed_from_id(nodeid: str) -> int:
    """A 31-bit seed from a test id: stable across runs and machines, different for every parametrization."""
    return zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def stress_round():
    """Index of the stress repetition (0 outside ``make test-stress``); its id suffix makes the seed differ."""
    return 0


@pytest.fixture
def seed(request, stress_round):
    """This test's seed, derived from its id (so a failing case is re-run with the same inputs by its id)."""
    value = seed_from_id(request.node.nodeid)
    request.node.user_properties.append(("seed", value))
    return value


def pytest_generate_tests(metafunc):
    if STRESS_SEEDS > 0 and "stress_round" in metafunc.fixturenames:
        metafunc.parametrize("stress_round", range(STRESS_SEEDS), ids=[f"seed{i}" for i in range(STRESS_SEEDS)])


def pytest_collection_modifyitems(config, items):
    """Under FASTDISTILL_STRESS_SEEDS, only tests (or parameter sets) marked ``stress`` are repeated."""
    _xdist_order(items)
    if STRESS_SEEDS <= 0:
        return
    keep, drop = [], []
    for item in items:
        rnd = getattr(item, "callspec", None) and item.callspec.params.get("stress_round", 0)
        (drop if rnd and item.get_closest_marker("stress") is None else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _xdist_order(items):
    """The order of ``make test``'s two pytest-xdist workers (``-n 2 --dist loadfile --no-loadscope-reorder``: a module
    runs whole on one worker, its module fixtures, e.g. a reference run, built once; modules are handed out in
    collection order to whichever worker is free): the modules with ``slow`` tests (the launched multi-process runs,
    the Triton AOT compile, the plain ``pip install``) first, so no worker is left with a long one at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only under xdist; every worker sorts its collection the same way
        slow = {i.nodeid.split("::")[0] for i in items if i.get_closest_marker("slow")}
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: order within a module kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        report.sections.append(
            ("fastdistill seed", f"seed={seeds[0]} (zlib.crc32 of the test id); reproduce with: pytest '{item.nodeid}'")
        )


def generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed`` (draw on the CPU, then move: the same inputs on every device)."""
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------- tolerances
def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| (absolute when ref is 0); inf when x has a non-finite entry that ref has not."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    same_nonfinite = ~torch.isfinite(ref) & ((x == ref) | (torch.isnan(x) & torch.isnan(ref)))
    if (~torch.isfinite(x) & ~same_nonfinite).any() or (~torch.isfinite(ref) & ~same_nonfinite).any():
        return float("inf")
    keep = torch.isfinite(ref)
    diff = torch.linalg.vector_norm((x - ref)[keep]).item()
    scale = torch.linalg.vector_norm(ref[keep]).item()
    return diff / scale if scale > 0 else diff


def assert_within_torch_error(
    got, ref, torch_got, *, summands: int = 1, what: str = "result", factor: float = TORCH_ERROR_FACTOR
) -> None:
    """Assert ``got`` is at most ``factor`` x as far from the float64 ``ref`` as plain torch's ``torch_got``.

    Errors are relative norms, ``||x - ref|| / ||ref||``. Torch's error is one draw of a rounding error and can be
    near 0 by luck (a scalar loss especially), so it is floored at the typical rounding error of ``got`` itself: a
    sum of ``summands`` terms in ``got``'s dtype, ``unit_roundoff * sqrt(summands)`` (pass the number of logits
    reduced into a loss; 1 for elementwise results such as gradients). ``got``, ``ref`` and ``torch_got`` may be
    tensors or sequences of tensors (checked pairwise).
    """
    if isinstance(got, (list, tuple)):
        names = [f"{what}[{i}]" for i in range(len(got))] if isinstance(what, str) else what
        for g, r, t, n in zip(got, ref, torch_got, names, strict=True):
            assert_within_torch_error(g, r, t, summands=summands, what=n, factor=factor)
        return
    assert got is not None, f"{what}: got None"
    assert got.is_floating_point(), f"{what}: got dtype {got.dtype}"
    unit = torch.finfo(got.dtype).eps / 2 * max(summands, 1) ** 0.5
    err, torch_err = _rel_err(got, ref), _rel_err(torch_got, ref)
    bound = factor * max(torch_err, unit)
    assert err <= bound, (
        f"{what}: relative error {err:.3g} vs float64 exceeds {factor} x plain torch's {torch_err:.3g} (dtype "
        f"{got.dtype}, torch {torch_got.dtype}, shape {tuple(ref.shape)}; bound {bound:.3g}, ratio "
        f"{err / max(torch_err, unit):.2f})"
    )


def assert_close(got, want, *, msg: str | None = None, **tolerances) -> None:
    """``torch.testing.assert_close`` in float64 on the CPU that keeps torch's report and prefixes ``msg`` to it."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if msg:
        torch.testing.assert_close(got, want, msg=lambda report: f"{msg}: {report}", **tolerances)
    else:
        torch.testing.assert_close(got, want, **tolerances)


# --------------------------------------------------------------------------------------------------- user errors
def assert_one_line_error(msg: str, words, *, start: str = "") -> None:
    """A user-facing error (a ``ConfigError``'s text, or what the CLI printed): one line, beginning with ``start``,
    that contains each of ``words`` (the key, what was given, what was expected)."""
    assert "\n" not in msg, msg
    assert msg.startswith(start), (start, msg)
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture
def device():
    return DEVICE


def available_backends(device: torch.device = DEVICE, *, cpp_op: str | None = None, cuda_op: str | None = None):
    """Backends that can run ``cpp_op`` on ``device`` here (torch always; triton on CUDA or in the interpreter; cpp
    where the extension is built). ``cuda_op`` is accepted and ignored: there is no CUDA C++ backend any more."""
    from fastdistill import _backend

    out = ["torch"]
    if _backend.triton_available() and (device.type == "cuda" or _backend.triton_interpret()):
        out.append("triton")
    if device.type == "cpu" and cpp_op and _backend.has_cpp_op(cpp_op):
        out.append("cpp")
    return out
