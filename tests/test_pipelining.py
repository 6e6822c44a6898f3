"""Every sharded module of DTN with MemoNet is pipelined by ``TrainPipelineSparseDist``.

The MemoNet pair ids come from ``PairHasher``, a parameter-free module of the batch's KJT that
the pipeline (``pipeline_postproc=True``, as the trainer builds it) runs in its sparse-data-dist
stage, so the codebooks' input all-to-all overlaps the previous step like the field tables'.
"""

from __future__ import annotations

from collections import Counter
from typing import List

import pytest
import torch
from single_rank import (
    CPU,
    random_batch,
    sharded_train_model,
    sparse_dist_pipeline,
)
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist, train_pipelines
from torchrec.distributed.types import ShardedModule

from dtn_torchrec.distributed.config import DenseOptimizerConfig
from dtn_torchrec.distributed.optimizers import build_dense_optimizer
from dtn_torchrec.models.experts.memonet import MemoNetExpert, PairIdDedup
from dtn_torchrec.models.pair_hash import PairHasher


def _not_pipelined_after_first_step(
    monkeypatch: pytest.MonkeyPatch, pipeline: TrainPipelineSparseDist
) -> List[str]:
    reported: List[List[str]] = []
    rewrite = train_pipelines._rewrite_model

    def spy(*args, **kwargs):
        result = rewrite(*args, **kwargs)
        reported.append(list(result[-1]))  # the fqns of sharded modules left unpipelined
        return result

    monkeypatch.setattr(train_pipelines, "_rewrite_model", spy)
    pipeline.progress(iter([random_batch(seed) for seed in range(2)]))
    assert len(reported) == 1
    return reported[0]


@pytest.mark.slow
def test_dtn_with_memonet_has_no_unpipelined_module(
    one_rank, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = sharded_train_model("dtn")
    pipeline = sparse_dist_pipeline(model)
    assert _not_pipelined_after_first_step(monkeypatch, pipeline) == []
    sharded = [m for m in model.modules() if isinstance(m, ShardedModule)]
    codebooks = [m for m in model.modules() if isinstance(m, MemoNetExpert)]
    assert codebooks and all(isinstance(m.codebook, ShardedModule) for m in codebooks)
    assert {id(m) for m in pipeline._pipelined_modules} == {id(m) for m in sharded}
    postprocs = [type(p._postproc_module) for p in pipeline._pipelined_postprocs]
    # the pair hashing, then each MemoNet expert's distinct ids (dedup_ids) of its output
    memonets = [m for m in model.modules() if isinstance(m, MemoNetExpert)]
    assert Counter(postprocs) == {PairHasher: 1, PairIdDedup: len(memonets)} and memonets


@pytest.mark.slow
def test_without_postproc_pipelining_the_codebooks_are_reported(
    one_rank, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check above can fail: the same model without pipeline_postproc leaves them blocking.
    model = sharded_train_model("dtn")
    optimizer = build_dense_optimizer(model, DenseOptimizerConfig()).optimizer
    pipeline = TrainPipelineSparseDist(model, optimizer, CPU, execute_all_batches=True)
    left = _not_pipelined_after_first_step(monkeypatch, pipeline)
    assert left and all("codebook" in fqn for fqn in left)


@pytest.mark.slow
def test_pipelined_steps_equal_plain_steps(one_rank) -> None:
    batches = [random_batch(seed) for seed in range(3)]
    pipelined = sparse_dist_pipeline(sharded_train_model("dtn"))
    source = iter(batches)
    pipelined_losses = [pipelined.progress(source)[0] for _ in batches]

    model = sharded_train_model("dtn")
    optimizer = build_dense_optimizer(model, DenseOptimizerConfig()).optimizer
    plain_losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss, (detached, _, _) = model(batch)
        loss.backward()
        optimizer.step()
        plain_losses.append(detached)
    torch.testing.assert_close(torch.stack(pipelined_losses), torch.stack(plain_losses))
