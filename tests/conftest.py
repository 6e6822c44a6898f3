"""Suite-wide fixtures and markers.

* Every test runs on CPU + gloo, also on a CUDA host: ``DTN_DEVICE=cpu`` is set for the whole
  session (before any module-scoped process group), and the ranks and subprocesses the tests
  start inherit it. A test that needs a GPU is marked ``cuda`` and asks for it explicitly
  (``init_distributed("cuda")``); it is skipped where torch sees no CUDA device.
"""

from __future__ import annotations

from typing import Iterator, List

import pytest
import torch
import torch.distributed as dist

from dtn_torchrec.distributed.launch import DEVICE_ENV, DistributedContext, init_distributed


@pytest.fixture(scope="session", autouse=True)
def cpu_device() -> Iterator[str]:
    """Pins ``init_distributed`` (here and in started processes) to CPU + gloo."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEVICE_ENV, "cpu")
        yield "cpu"


@pytest.fixture(scope="module")
def one_rank(cpu_device: str) -> Iterator[DistributedContext]:
    """A one-rank gloo process group for the module's tests (DMP and checkpoints are collective)."""
    assert not dist.is_initialized(), "another test left a process group behind"
    ctx = init_distributed()
    yield ctx
    dist.destroy_process_group()


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
