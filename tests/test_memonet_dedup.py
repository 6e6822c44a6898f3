"""MemoNet's distinct-id lookup (``dedup_ids``): the same codewords, gradients and row-wise
Adagrad step as looking every id up, down to FBGEMM's fused update."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from single_rank import BATCH_SIZE, CPU, SCHEMA, model_section, random_batch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.distributed.build import build_meta_train_model, build_sharded_model
from dtn_torchrec.distributed.config import ShardingConfig, SparseOptimizerConfig
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.experts import memonet
from dtn_torchrec.models.experts.memonet import MemoNetExpert, PairIdDedup, merge_distinct_rows
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY
from dtn_torchrec.models.types import ExpertInputs

BUCKETS, DIM = 50, 8


def pair_ids(batch: int, per_row: int, seed: int = 0) -> KeyedJaggedTensor:
    """Ids from a skewed distribution over ``BUCKETS`` rows, so most repeat; one id per bag,
    as ``PairHasher`` emits them."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.rand(batch * per_row, generator=g) ** 3 * BUCKETS).long()
    return KeyedJaggedTensor(
        keys=[MEMONET_PAIRS_KEY],
        values=ids,
        lengths=torch.ones(ids.numel(), dtype=torch.int32),
        stride=ids.numel(),
    )


def test_dedup_gives_sorted_distinct_ids_and_their_inverse() -> None:
    kjt = pair_ids(batch=6, per_row=10)
    ids, inverse = PairIdDedup(BUCKETS)(kjt)
    values = kjt.values()
    assert torch.equal(ids.values(), torch.unique(values))
    assert torch.equal(ids.values()[inverse], values)
    num_distinct = ids.values().numel()
    assert ids.keys() == [MEMONET_PAIRS_KEY] and ids.stride() == num_distinct < 60
    assert ids.lengths().tolist() == [1] * num_distinct  # one id per bag
    assert ids.length_per_key() == [num_distinct]


def _merge_reference(
    rows: torch.Tensor, weight: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """The merge as the per-id path computes it: ``[z_1; ...; z_K] W^T`` over gathered rows."""
    return nn.functional.linear(rows[inverse].view(-1, weight.shape[1]), weight)


@pytest.mark.parametrize("upcast_rows", [3, 16384])  # the backward upcasts 3 rows at a time
def test_merge_distinct_rows_is_the_merge_of_the_gathered_rows(
    upcast_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memonet, "_UPCAST_ROWS", upcast_rows)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, DIM, generator=g, requires_grad=True)
    weight = torch.randn(DIM, 2 * DIM, generator=g, requires_grad=True)
    inverse = torch.tensor([3, 0, 3, 3, 1, 0, 3, 3])  # 4 pairs x 2 hashes; rows 2, 4 unused
    grad = torch.randn(4, DIM, generator=g)
    ref_rows, ref_weight = (
        rows.detach().clone().requires_grad_(),
        weight.detach().clone().requires_grad_(),
    )
    expected = _merge_reference(ref_rows, ref_weight, inverse)
    out = merge_distinct_rows(rows, weight, inverse)
    torch.testing.assert_close(out, expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(rows.grad, ref_rows.grad)
    torch.testing.assert_close(weight.grad, ref_weight.grad)
    assert torch.equal(rows.grad[[2, 4]], torch.zeros(2, DIM))  # rows never gathered


def test_merge_distinct_rows_sums_repeated_rows_gradient_in_fp32() -> None:
    # One head row read by 4096 pairs: a bf16 running sum would stall once the sum dwarfs
    # each term; the fp32 sum matches the fp32 reference to bf16 rounding of the result.
    rows = torch.randn(3, DIM, requires_grad=True)
    weight = torch.eye(DIM).repeat(1, 2).requires_grad_()  # z' = row_a + row_b
    inverse = torch.zeros(2 * 4096, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = merge_distinct_rows(rows, weight, inverse)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), (2 * rows.detach()[0]).expand(4096, DIM), rtol=1e-2, atol=1e-2
    )
    out.backward(torch.full((4096, DIM), 0.01, dtype=torch.bfloat16))
    assert rows.grad.dtype == torch.float32
    expected = 2 * 4096 * torch.tensor(0.01, dtype=torch.bfloat16).float()
    torch.testing.assert_close(rows.grad[0], expected.expand(DIM), rtol=1e-2, atol=0)


def _expert(dedup_ids: bool) -> MemoNetExpert:
    torch.manual_seed(0)
    return MemoNetExpert(
        num_fields=4,
        embedding_dim=DIM,
        num_crossed_fields=4,
        num_hash=2,
        num_buckets=BUCKETS,
        codeword_dim=DIM,
        output_dim=6,
        dedup_ids=dedup_ids,
        name="x",
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_expert_with_and_without_dedup_agree(autocast: bool) -> None:
    batch = 7
    g = torch.Generator().manual_seed(2)
    inputs = ExpertInputs(
        fields=torch.randn(batch, 4, DIM, generator=g),
        flat=torch.randn(batch, 4 * DIM, generator=g),
        pair_ids=pair_ids(batch, per_row=6 * 2),
    )
    grads: Dict[bool, Dict[str, torch.Tensor]] = {}
    outs = {}
    for dedup in (False, True):
        expert = _expert(dedup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs[dedup] = expert(inputs)
        outs[dedup].float().square().sum().backward()
        grads[dedup] = {n: p.grad for n, p in expert.named_parameters()}
    torch.testing.assert_close(outs[True], outs[False])
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        if autocast:
            # bf16: the merge runs on distinct rows before the gather, so its GEMMs round
            # other bf16 operands than the per-id path's: equal to bf16 rounding (~4e-3).
            diff = (grads[True][name] - grads[False][name]).norm() / grads[False][name].norm()
            assert diff < 1e-2, (name, diff)
        else:
            torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-6)


def _rowwise_adagrad_table() -> SplitTableBatchedEmbeddingBagsCodegen:
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(BUCKETS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,  # the codebook's kernel, fed one id per bag
    )


def test_fbgemm_rowwise_adagrad_step_is_the_same_with_distinct_ids() -> None:
    # FBGEMM sums the gradients of repeated ids before its row-wise Adagrad update; looking up
    # the distinct ids and summing in the gather's backward gives the same step.
    ids = pair_ids(batch=8, per_row=12).values()
    grad = torch.randn(ids.numel(), DIM, generator=torch.Generator().manual_seed(3))
    every, distinct = _rowwise_adagrad_table(), _rowwise_adagrad_table()
    start = every.split_embedding_weights()[0].clone()
    distinct.split_embedding_weights()[0].copy_(start)

    every(ids, torch.arange(ids.numel() + 1)).backward(grad)
    unique, inverse = torch.unique(ids, return_inverse=True)
    rows = distinct(unique, torch.arange(unique.numel() + 1))
    rows[inverse].backward(grad)

    updated = every.split_embedding_weights()[0]
    torch.testing.assert_close(distinct.split_embedding_weights()[0], updated)
    # and it is the formula: w -= lr g / (sqrt(mean(g^2)) + eps), g the summed gradient
    summed = torch.zeros(BUCKETS, DIM).index_add_(0, ids, grad)
    state = summed.square().mean(dim=1, keepdim=True)
    torch.testing.assert_close(updated, start - 0.1 * summed / (state.sqrt() + 1e-8))
    assert not torch.equal(updated[unique], start[unique])


def _codebooks(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        k: (v.local_tensor() if isinstance(v, ShardedTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
        if "codebook" in k
    }


def _sharded_dtn(dedup_ids: bool, sharding_type: str) -> nn.Module:
    """``single_rank.sharded_train_model("dtn")`` with ``dedup_ids`` set on its MemoNet and
    every table sharded ``sharding_type``."""
    raw = model_section("dtn")
    for method in raw["dtn"]["methods"]:
        if method["kind"] == "memonet":
            method["dedup_ids"] = dedup_ids
    torch.manual_seed(0)
    module = build_meta_train_model(
        model_config_from_dict(raw), SCHEMA, SparseOptimizerConfig(name="rowwise_adagrad", lr=0.1)
    )
    return build_sharded_model(
        module,
        ShardingConfig(sharding_types=[sharding_type]),
        SCHEMA,
        device=CPU,
        batch_size=BATCH_SIZE,
    ).model


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "column_wise"])
def test_sharded_codebook_step_is_the_same_with_and_without_dedup(
    one_rank, sharding_type: str
) -> None:
    batch = random_batch(seed=0)
    before: Dict[bool, Dict[str, torch.Tensor]] = {}
    after: Dict[bool, Dict[str, torch.Tensor]] = {}
    for dedup in (False, True):
        model = _sharded_dtn(dedup, sharding_type)
        experts = [m for m in model.modules() if isinstance(m, MemoNetExpert)]
        assert experts and all((m.dedup is not None) == dedup for m in experts)
        before[dedup] = _codebooks(model)
        loss, _ = model(batch)
        loss.backward()  # the codebook's fused row-wise Adagrad steps here
        after[dedup] = _codebooks(model)
    assert after[True].keys() == after[False].keys() == before[True].keys() and before[True]
    for key in before[True]:
        torch.testing.assert_close(before[True][key], before[False][key], rtol=0, atol=0)
        assert not torch.equal(after[False][key], before[False][key])
        torch.testing.assert_close(after[True][key], after[False][key])
