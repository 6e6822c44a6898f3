"""train.allocator: freed step-sized blocks stay in the heap (no page faults per step)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A step's worth of allocations (3, 5 and 8 MiB, freed in another order than allocated), run
# in a fresh interpreter: the thresholds are process-wide.
_PROBE = """
import resource, sys
import numpy as np
from dtn_torchrec.train.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else None
def step():
    a = np.ones(3 * 2**17); b = np.ones(5 * 2**17); c = a + 1
    del a
    d = np.ones(2**20)
    return float(b[0] + c[0] + d[0])
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults_per_step(mode: str) -> tuple:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    applied, faults = _faults_per_step("on")
    assert applied == "True"
    assert faults < 50  # the 16 MiB of a step would be 4,096 pages
    _, default_faults = _faults_per_step("off")
    assert default_faults > 1000  # glibc's defaults give the pages back every step
