"""geostore's torch thread count on a busy machine (`geostore.threads`): one thread beside busy processes, the
user's settings kept, torch's count restored, and results that do not depend on the count chosen."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from geostore import threads
from geostore.analysis.curvature import loss_hvp
from geostore.analysis.flatness import compute_landscape_flatness, flatness_for_params
from geostore.family import modular_addition as fam
from geostore.family.base import Parameter, ParameterTable

# A plain Python busy loop that ends itself when the test process is gone.
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10**5):\n        pass\n"


REGRESSOR_TABLE = ParameterTable((Parameter("weight", (1, 8), ("out", "in"), ("weight",)),
                                  Parameter("bias", (1,), ("out",), ("bias",))))


@dataclass(frozen=True)
class CountingRegressor:
    """A user's model family (a linear regressor, no fast loss) whose loss notes torch's thread count each time."""

    table: ParameterTable = REGRESSOR_TABLE
    counts: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    family: str = "counting_regressor"
    needs_probe: bool = False

    def build(self, params=None) -> torch.nn.Module:
        net = torch.nn.Linear(8, 1)
        if params is not None:
            net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in self.table.state_dict(params).items()})
        return net

    def probe(self, stored=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        return x, x.sum(dim=1, keepdim=True)

    def losses(self, forward, probe) -> torch.Tensor:
        self.counts.append(torch.get_num_threads())
        x, y = probe
        return ((forward(x) - y) ** 2).mean(dim=1)


@pytest.fixture
def torch_default_threads(monkeypatch) -> Iterator[int]:
    """Torch at its default thread count and no thread-count variable set (what geostore may fit) within; the test
    process's count restored."""
    for name in threads.USER_THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads.default_threads())
    yield threads.default_threads()
    torch.set_num_threads(saved)


@pytest.fixture
def busy_machine() -> Iterator[None]:
    """One busy process per core beside the test, running (seen by `busy_elsewhere`) within."""
    cores = os.cpu_count() or 1
    if cores > 8:
        pytest.skip("one busy process per core is too many here")
    if threads.busy_elsewhere() is None:
        pytest.skip("the runnable-thread count cannot be read here (not Linux)")
    jobs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(cores)]
    try:
        deadline = time.monotonic() + 20
        while threads.busy_elsewhere() < cores and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        for job in jobs:
            job.kill()
            job.wait()


def test_beside_busy_processes_torch_runs_one_thread_and_the_users_settings_win(torch_default_threads, busy_machine,
                                                                              monkeypatch):
    with threads.fitted() as n:
        assert n == torch.get_num_threads() == 1
        with threads.fitted() as inner:  # nested: the outer count
            assert inner == 1
    assert torch.get_num_threads() == torch_default_threads

    torch.set_num_threads(torch_default_threads + 1)  # the user's own count, not torch's default: kept
    with threads.fitted() as n:
        assert n == torch.get_num_threads() == torch_default_threads + 1
    torch.set_num_threads(torch_default_threads)

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch_default_threads))
    with threads.fitted() as n:
        assert n == torch.get_num_threads() == torch_default_threads


def test_loss_evaluations_run_fitted_and_derivatives_keep_torchs_count(torch_default_threads, busy_machine):
    """The evaluators every entry point uses (ingest, the CLI, geoview's workers, library calls) fit each block of
    loss evaluations; Hessian-vector products, whose last bits depend on the count, keep torch's."""
    model = CountingRegressor()
    params = {"weight": np.ones((1, 8), np.float32), "bias": np.zeros(1, np.float32)}
    flatness_for_params(params, model, n_directions=2, epsilon=0.1, seed=0)
    compute_landscape_flatness(model.build(params), model.probe(), lambda net, probe: model.losses(net, probe).mean(),
                               n_directions=2, epsilon=0.1, seed=0)
    assert len(model.counts) >= 4 and set(model.counts) == {1}
    model.counts.clear()
    hvp, n_params = loss_hvp(params, model)
    hvp(torch.ones(1, n_params))
    assert model.counts and set(model.counts) == {torch_default_threads}
    assert torch.get_num_threads() == torch_default_threads


def test_torch_count_is_restored_when_the_work_raises(torch_default_threads):
    with pytest.raises(RuntimeError, match="in the block"), threads.fitted():
        raise RuntimeError("in the block")
    assert torch.get_num_threads() == torch_default_threads
    with threads.fitted() as n:
        assert 1 <= n <= torch_default_threads


def test_flatness_is_bit_identical_whatever_thread_count_is_used(torch_default_threads):
    """The counts the fitting may choose (1 up to torch's default) give the same stored values: each count is
    fixed as a user would fix it, on a model large enough for torch to split its work between threads."""
    config = fam.model_config(31, d_model=32, n_heads=4)
    model = fam.MODULAR_ADDITION.model(config)
    rng = np.random.default_rng(0)  # weights of the init's scale, without loading TransformerLens to draw them
    params = {p.name: (rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])).astype(np.float32)
              for p in model.table.parameters}
    results = []
    for count in sorted({1, 2, torch_default_threads}):
        torch.set_num_threads(count)
        results.append(flatness_for_params(params, model, n_directions=2, epsilon=0.1, seed=0))
    torch.set_num_threads(torch_default_threads)
    results.append(flatness_for_params(params, model, n_directions=2, epsilon=0.1, seed=0))  # fitted
    for baseline, deltas in results[1:]:
        assert baseline == results[0][0]
        np.testing.assert_array_equal(deltas, results[0][1])


def test_a_pure_batched_loss_is_shared_among_single_threaded_workers(torch_default_threads):
    """`split_sets`: torch's count of workers, each with one torch thread, compute the weight sets one at a time
    at once (a barrier proves two run together); the losses come back in order, errors reach the caller, and torch's
    count is the caller's again after."""
    if torch_default_threads < 2:
        pytest.skip("one core: nothing to share")
    seen = []
    together = threading.Barrier(2, timeout=10)

    def loss(weights):
        name = threading.current_thread().name
        if name not in {n for n, _ in seen}:  # each worker's first set: two workers must be in here at once
            together.wait()
        seen.append((name, torch.get_num_threads()))
        if weights["w"][0, 0] < 0:
            raise ValueError("a negative weight")
        return weights["w"].sum(dim=1, dtype=torch.float64)

    weights = {"w": torch.arange(12.0).reshape(6, 2)}
    got = threads.split_sets(loss)(weights)
    assert torch.equal(got, weights["w"].sum(dim=1, dtype=torch.float64))
    assert len(seen) == 6 and {count for _, count in seen} == {1}
    assert 2 <= len({name for name, _ in seen}) <= torch_default_threads
    assert threading.current_thread().name not in {name for name, _ in seen}
    assert torch.get_num_threads() == torch_default_threads

    together = threading.Barrier(1)
    with pytest.raises(ValueError, match="a negative weight"):
        threads.split_sets(loss)({"w": -weights["w"]})
    assert torch.get_num_threads() == torch_default_threads

    torch.set_num_threads(1)  # the user's own count (or a Dask task's): the loss runs as it is, in this thread
    seen.clear()
    threads.split_sets(loss)(weights)
    assert seen == [(threading.current_thread().name, 1)]
