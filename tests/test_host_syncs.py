"""No host syncs in a training step: our code reads nothing back from the device and copies no
Python data to it.

One ``TrainPipelineSparseDist.progress`` (input dist of the next batch, forward, backward, fused
and dense optimizer steps) of the DMP-wrapped DTN with MemoNet, and of MMoE, and the trainer's
``LossWindow.add`` of its output run after a warm-up step with the host-sync entry points
patched: ``Tensor.tolist/item/cpu/numpy``, ``__bool__/__int__/__float__/__index__`` (a tensor
used as a Python value), and tensors built
from Python lists or tuples (``torch.tensor``, ``torch.as_tensor``, ``Tensor.new_tensor``, and
indexing with a list, which builds its index tensor on the host).

A call counts when the nearest of its callers that is either this project's code or a library
part that owns its syncs (TorchRec's sharded modules and dists, FBGEMM, ``torch.optim``) is this
project's code. TorchRec's own split exchanges (``dist_data``) and FBGEMM's CPU iteration counter
are theirs. CPU tensors stand in for device tensors: on CUDA each counted call would be a sync or
a blocking host-to-device copy.
"""

from __future__ import annotations

import threading
import traceback
from collections import Counter
from typing import Callable, Iterator, List

import pytest
import torch
from single_rank import (
    CPU,
    TASKS,
    random_batch,
    sharded_train_model,
    sparse_dist_pipeline,
)

from dtn_torchrec.train.loss_window import LossWindow

OURS = "/dtn_torchrec/"
LIBRARY_OWNED = ("/torchrec/distributed/", "/fbgemm_gpu/", "/torch/optim/")
TENSOR_METHODS = (
    "tolist",
    "item",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)


class HostSyncCounter:
    """Patches the host-sync entry points; counts calls on this thread attributed to our code."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self._thread = threading.get_ident()
        self._restore: List[Callable[[], None]] = []

    def _record(self, what: str) -> None:
        if threading.get_ident() != self._thread:
            return  # the reader's prefetch thread is not the step
        for frame in reversed(traceback.extract_stack()[:-2]):
            if any(part in frame.filename for part in LIBRARY_OWNED):
                return
            if OURS in frame.filename:
                where = frame.filename.split(OURS)[-1]
                self.calls[f"{what} at {where}:{frame.lineno}"] += 1
                return

    def _patch(self, owner: object, name: str, counts: Callable[..., bool]) -> None:
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if counts(*args, **kwargs):
                self._record(name)
            return original(*args, **kwargs)

        setattr(owner, name, patched)
        self._restore.append(lambda: setattr(owner, name, original))

    def __enter__(self) -> "HostSyncCounter":
        for name in TENSOR_METHODS:
            self._patch(torch.Tensor, name, lambda *a, **k: True)

        def from_python_data(data=None, *args, **kwargs) -> bool:
            return isinstance(data, (list, tuple))

        def new_from_python_data(self_tensor=None, data=None, *args, **kwargs) -> bool:
            return isinstance(data, (list, tuple))

        def indexes_with_list(self_tensor=None, index=None) -> bool:
            parts = index if isinstance(index, tuple) else (index,)
            return any(isinstance(part, list) for part in parts)

        self._patch(torch.Tensor, "__getitem__", indexes_with_list)
        self._patch(torch, "tensor", from_python_data)
        self._patch(torch, "as_tensor", from_python_data)
        self._patch(torch.Tensor, "new_tensor", new_from_python_data)
        return self

    def __exit__(self, *exc) -> None:
        for restore in reversed(self._restore):
            restore()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dtn", "mmoe"])
def test_no_host_sync_in_a_pipelined_training_step(one_rank, name: str) -> None:
    model = sharded_train_model(name)
    pipeline = sparse_dist_pipeline(model)
    batches: Iterator = iter([random_batch(seed) for seed in range(4)])
    pipeline.progress(batches)  # warm-up: traces the model, creates the input dists
    window = LossWindow(TASKS, CPU)
    with HostSyncCounter() as counter:
        loss, logits, labels = pipeline.progress(batches)
        window.add((loss, logits, labels))  # the trainer's per-step loss sums
    assert logits.shape == (16, 2) and torch.isfinite(loss).all()
    assert dict(counter.calls) == {}


def test_counter_counts_only_calls_attributed_to_project_code() -> None:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    features = KeyedJaggedTensor(keys=["a"], values=torch.arange(3), lengths=torch.tensor([1, 2]))
    ours = compile(
        "x.tolist(); int(x[0, 0]); torch.tensor([1, 2]); x[:, [1, 0]]",
        "/src/dtn_torchrec/probe.py",
        "exec",
    )
    with HostSyncCounter() as counter:
        torch.tensor([1, 2]).tolist()  # this test file: not ours
        features.length_per_key()  # TorchRec's tolist, called from a test: not ours
        exec(ours, {"x": torch.arange(6).view(3, 2), "torch": torch})
    assert dict(counter.calls) == {
        "tolist at probe.py:1": 1,
        "__int__ at probe.py:1": 1,
        "tensor at probe.py:1": 1,
        "__getitem__ at probe.py:1": 1,
    }
