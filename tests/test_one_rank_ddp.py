"""One rank: ``shard_model`` replaces DDP's gradient all-reduce (and its division by the world
size) by PyTorch's no-op hook: the local gradients. That the step still equals an unsharded reference is
``test_sharding.py::test_one_rank_step_matches_unsharded``."""

from __future__ import annotations

import pytest
import torch
from single_rank import random_batch, sharded_train_model
from torch.nn.parallel import DistributedDataParallel


@pytest.mark.usefixtures("one_rank")
def test_one_rank_backward_runs_no_all_reduce() -> None:
    model = sharded_train_model("mmoe")
    assert isinstance(model._dmp_wrapped_module, DistributedDataParallel)
    model(random_batch(0))[0].backward()  # static_graph's first backward syncs its unused-set
    loss, _ = model(random_batch(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    ops = {e.key for e in prof.key_averages()}
    assert not [op for op in ops if "allreduce" in op or "reducer::mul_out" in op], sorted(ops)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[:5])
