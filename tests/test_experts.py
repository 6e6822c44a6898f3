"""Every expert against a direct re-computation of its formula, gradient flow, init, meta + DMP."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
from dtn_torchrec.models.embedding import EmbeddingConfig, SparseArch
from dtn_torchrec.models.experts import (
    DCNConfig,
    ExpertConfig,
    GDCNConfig,
    MaskNetConfig,
    MemoNetConfig,
    MLPConfig,
    memonet_pair_hash,
)
from dtn_torchrec.models.pair_hash import MEMONET_PAIRS_KEY, PairHashConfig, field_pairs
from dtn_torchrec.models.types import ExpertInputs

B, F, D = 3, 4, 5
SCHEMA = SchemaSpec(
    fields=[
        FieldSpec("a", 30, max_length=1),
        FieldSpec("h", 40, max_length=6),
        FieldSpec("b", 20, max_length=1),
        FieldSpec("c", 25, max_length=1),
    ],
    labels=["click", "conversion"],
)
BUCKETS = 23


def pair_config(num_hash: int = 2) -> PairHashConfig:
    return PairHashConfig(num_hash=num_hash, num_buckets=BUCKETS).resolve(SCHEMA)


def make_inputs(num_hash: int = 2, seed: int = 0) -> ExpertInputs:
    g = torch.Generator().manual_seed(seed)
    pairs = pair_config(num_hash).num_pairs
    ids = torch.randint(0, BUCKETS, (B * pairs * num_hash,), generator=g)
    pair_ids = KeyedJaggedTensor(
        keys=[MEMONET_PAIRS_KEY], values=ids, lengths=torch.full((B,), pairs * num_hash)
    )
    return ExpertInputs(
        fields=torch.randn(B, F, D, generator=g).requires_grad_(),
        flat=torch.randn(B, F * D, generator=g).requires_grad_(),
        pair_ids=pair_ids,
    )


def randomise(module: nn.Module, seed: int = 1) -> None:
    """Non-default values for every parameter, so a missing bias or LN affine would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def hashes(cfg: ExpertConfig) -> int:
    """Hash functions of the pair ids an expert reads (2 unless a MemoNet asks otherwise)."""
    return cfg.num_hash if isinstance(cfg, MemoNetConfig) else 2


def build(cfg: ExpertConfig, num_hash: int = 2, device: Optional[torch.device] = None) -> nn.Module:
    return cfg.build(F, D, name="x", device=device, pair_hash=pair_config(num_hash))


def lin(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    y = x @ layer.weight.t()
    return y if layer.bias is None else y + layer.bias


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def relu_stack(x: torch.Tensor, stack: nn.Module) -> torch.Tensor:
    for layer in stack.layers:
        if isinstance(layer, nn.Linear):
            x = torch.clamp(lin(x, layer), min=0.0)
    return x


# ---------------------------------------------------------------------------------------------
# Reference formulas (plain tensor ops on the module's parameters)


def ref_mlp(e: nn.Module, x: ExpertInputs) -> torch.Tensor:
    return relu_stack(x.flat, e.mlp)


def ref_gdcn(e: nn.Module, x: ExpertInputs) -> torch.Tensor:
    x0 = x.flat
    c = x0
    for layer in e.cross_layers:
        wc, wg, b = layer.cross.weight, layer.gate.weight, layer.bias
        c = x0 * (c @ wc.t() + b) * (1.0 / (1.0 + torch.exp(-(c @ wg.t())))) + c
    if e.structure == "stacked":
        c = relu_stack(c, e.mlp)
    elif e.structure == "parallel":
        c = torch.cat([c, relu_stack(x0, e.mlp)], dim=1)
    return lin(c, e.projection)


def ref_dcn(e: nn.Module, x: ExpertInputs) -> torch.Tensor:
    x0 = x.flat
    c = x0
    for layer in e.cross_layers:
        w = layer.up.weight if layer.down is None else layer.up.weight @ layer.down.weight
        c = x0 * (c @ w.t() + layer.up.bias) + c
    return lin(c, e.projection)


def ref_masknet(e: nn.Module, x: ExpertInputs) -> torch.Tensor:
    v_emb = x.flat
    v = v_emb
    if e.emb_norm is not None:
        v = layer_norm(v_emb.reshape(B, F, D), e.emb_norm).reshape(B, F * D)

    def block(blk: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        mask = lin(torch.clamp(lin(v_emb, blk.mask.aggregate), min=0.0), blk.mask.project)
        return torch.clamp(layer_norm(lin(inp * mask, blk.hidden), blk.norm), min=0.0)

    if e.mode == "parallel":
        h = torch.cat([block(blk, v) for blk in e.blocks], dim=1)
    else:
        h = v
        for blk in e.blocks:
            h = block(blk, h)
    return relu_stack(h, e.mlp)


def ref_memonet(e: nn.Module, x: ExpertInputs, num_hash: int) -> torch.Tensor:
    n = len(pair_config(num_hash).fields)
    pairs = field_pairs(n)
    codebook = e.codebook.embedding_bags["memonet_codebook_x"].weight
    ids = x.pair_ids.values().reshape(B, len(pairs), num_hash)
    z = torch.cat([codebook[ids[:, :, k]] for k in range(num_hash)], dim=-1)  # [B, P, K*d]
    z = z @ e.merge.weight.t()
    if e.shrink is not None:
        squeezed = torch.clamp(x.fields.reshape(B, -1) @ e.shrink.squeeze.weight.t(), min=0.0)
        w = squeezed @ e.shrink.excite.weight.t()  # [B, P]
        shrunk = []
        for i in range(n):
            acc = 0.0
            for p, pair in enumerate(pairs):
                if i in pair:
                    acc = acc + w[:, p : p + 1] * z[:, p]
            shrunk.append(acc)
        z = torch.stack(shrunk, dim=1)
    return lin(torch.cat([x.fields.reshape(B, -1), z.reshape(B, -1)], dim=1), e.projection)


SMALL = dict(output_dim=6, hidden_dims=[7, 5])
VARIANTS: Dict[str, ExpertConfig] = {
    "mlp": MLPConfig(**SMALL),
    "mlp_dropout_eval": MLPConfig(dropout=0.5, **SMALL),
    "gdcn_projection": GDCNConfig(**SMALL),
    "gdcn_stacked": GDCNConfig(structure="stacked", num_cross_layers=3, **SMALL),
    "gdcn_parallel": GDCNConfig(structure="parallel", bias_init="uniform", **SMALL),
    "dcn_full": DCNConfig(output_dim=6),
    "dcn_low_rank": DCNConfig(output_dim=6, low_rank=2, num_cross_layers=3),
    "masknet_parallel": MaskNetConfig(
        output_dim=6, num_mask_blocks=3, mask_block_dim=8, mask_hidden_dim=9, mlp_dims=[8, 6]
    ),
    "masknet_serial": MaskNetConfig(
        output_dim=6,
        mode="serial",
        num_mask_blocks=3,
        mask_block_dim=8,
        mask_hidden_dim=9,
        mlp_dims=[8, 6],
    ),
    "masknet_emb_ln": MaskNetConfig(
        output_dim=6, emb_layernorm=True, mask_block_dim=8, mask_hidden_dim=9, mlp_dims=[6]
    ),
    "memonet": MemoNetConfig(output_dim=6, num_buckets=BUCKETS, codeword_dim=3),
    "memonet_gas": MemoNetConfig(output_dim=6, num_buckets=BUCKETS, codeword_dim=3, shrink="gas"),
    "memonet_3hash_gas": MemoNetConfig(output_dim=6, num_buckets=BUCKETS, num_hash=3, shrink="gas"),
}


def reference(name: str, e: nn.Module, x: ExpertInputs) -> torch.Tensor:
    kind = VARIANTS[name].kind
    if kind == "memonet":
        return ref_memonet(e, x, VARIANTS[name].num_hash)
    return {"mlp": ref_mlp, "gdcn": ref_gdcn, "dcn": ref_dcn, "masknet": ref_masknet}[kind](e, x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_expert_matches_formula(name: str) -> None:
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    expert = build(cfg, hashes(cfg)).eval()
    randomise(expert)
    x = make_inputs(hashes(cfg))
    out = expert(x)
    assert out.shape == (B, cfg.output_dim) and expert.output_dim == cfg.output_dim
    torch.testing.assert_close(out, reference(name, expert, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name: str) -> None:
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    expert = build(cfg, hashes(cfg)).eval()
    randomise(expert)
    x = make_inputs(hashes(cfg))
    out = expert(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for pname, p in expert.named_parameters():
        assert p.grad is not None, pname
        if "codebook" in pname:
            addressed = set(x.pair_ids.values().tolist())
            for row in range(p.shape[0]):
                assert (p.grad[row].abs().sum() > 0) == (row in addressed), (pname, row)
        else:
            assert p.grad.abs().sum() > 0, pname
    read = x.fields if cfg.kind == "memonet" else x.flat
    assert read.grad is not None and read.grad.abs().sum() > 0


def test_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    expert = build(VARIANTS["mlp_dropout_eval"])
    x = make_inputs()
    expert.train()
    assert not torch.equal(expert(x), expert(x))
    expert.eval()
    assert torch.equal(expert(x), expert(x))


@torch.no_grad()
def test_reference_initialisation() -> None:
    torch.manual_seed(0)
    n = 64  # flat width F*D for a meaningful std
    gdcn = GDCNConfig().build(16, 4, name="g", device=None)
    cross = gdcn.cross_layers[0]
    bound = math.sqrt(6.0 / (2 * n))  # glorot_uniform
    assert cross.cross.weight.abs().max() <= bound and cross.gate.weight.abs().max() <= bound
    assert abs(float(cross.cross.weight.std()) - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.count_nonzero(cross.bias) == 0
    proj = gdcn.projection  # glorot_normal, zero bias
    assert abs(float(proj.weight.std()) - math.sqrt(2.0 / (n + 256))) < 0.005
    assert torch.count_nonzero(proj.bias) == 0

    uni = GDCNConfig(bias_init="uniform").build(16, 4, name="g", device=None)
    b = uni.cross_layers[0].bias
    assert b.min() >= 0 and b.max() <= 1 and b.std() > 0.2

    masknet = MaskNetConfig().build(16, 4, name="m", device=None)
    for pname, p in masknet.named_parameters():
        if pname.endswith("norm.weight"):
            assert torch.all(p == 1), pname
        elif pname.endswith("bias"):
            assert torch.count_nonzero(p) == 0, pname

    memo = MemoNetConfig(num_buckets=5000).build(
        F, D, name="m", device=None, pair_hash=PairHashConfig(num_buckets=5000).resolve(SCHEMA)
    )
    codebook = memo.codebook.embedding_bags["memonet_codebook_m"].weight
    assert codebook.shape == (5000, D) and abs(float(codebook.std()) - 0.01) < 0.0005


def test_parameter_owners_reinitialise_themselves() -> None:
    # DMP materialises a meta module by calling reset_parameters on each module that directly
    # owns a meta parameter; without one it would keep uninitialised memory (or Kaiming init).
    meta = torch.device("meta")
    for name, cfg in VARIANTS.items():
        expert = build(cfg, hashes(cfg), device=meta)
        assert all(p.is_meta for p in expert.parameters()), name
        for mod_name, module in expert.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                assert callable(getattr(module, "reset_parameters", None)), (name, mod_name)


def test_memonet_codebooks_are_separate_tables_per_expert() -> None:
    ph = pair_config()
    cfg = VARIANTS["memonet"]
    e1 = cfg.build(F, D, name="ctr", device=None, pair_hash=ph)
    e2 = cfg.build(F, D, name="cvr", device=None, pair_hash=ph)
    assert [c.name for c in e1.codebook.embedding_bag_configs()] == ["memonet_codebook_ctr"]
    assert [c.name for c in e2.codebook.embedding_bag_configs()] == ["memonet_codebook_cvr"]
    assert e1.codebook.embedding_bag_configs()[0].feature_names == [MEMONET_PAIRS_KEY]


def test_config_and_builder_errors() -> None:
    with pytest.raises(ValueError, match=r"^mlp_dims: must end with output_dim=128"):
        MaskNetConfig(output_dim=128, mlp_dims=[256, 256])
    with pytest.raises(ValueError, match=r"^hidden_dims: must be a non-empty list"):
        GDCNConfig(structure="stacked", hidden_dims=[])
    assert GDCNConfig(structure="projection", hidden_dims=[]).hidden_dims == []
    with pytest.raises(ValueError, match="pair hashing"):
        MemoNetConfig().build(F, D, name="m", device=None)
    with pytest.raises(ValueError, match="num_hash/num_buckets"):
        MemoNetConfig(num_buckets=7).build(F, D, name="m", device=None, pair_hash=pair_config())
    with pytest.raises(ValueError, match="share"):
        memonet_pair_hash([MemoNetConfig(), MemoNetConfig(num_hash=3)], SCHEMA)
    assert memonet_pair_hash([GDCNConfig()], SCHEMA) is None
    with pytest.raises(ValueError, match="pair_ids"):
        build(VARIANTS["memonet"])(
            ExpertInputs(fields=torch.zeros(B, F, D), flat=torch.zeros(B, F * D))
        )


def test_sparse_arch_feeds_every_expert_end_to_end() -> None:
    cfgs = list(VARIANTS.values())[:-1]  # one addressing for all MemoNets (num_hash=2)
    ph = memonet_pair_hash(cfgs, SCHEMA)
    torch.manual_seed(0)
    arch = SparseArch(SCHEMA, EmbeddingConfig(embedding_dim=D), pair_hash=ph)
    experts = [c.build(F, D, name=f"e{k}", device=None, pair_hash=ph) for k, c in enumerate(cfgs)]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "h", "b", "c"],
        values=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
        lengths=torch.tensor([1, 1, 1, 3, 0, 2, 1, 1, 0, 1, 1, 1]),
    )
    inputs = arch(kjt)
    sum(e(inputs).sum() for e in experts).backward()
    for pname, p in arch.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------------------------
# DistributedModelParallel on one gloo rank: meta construction, default planner, EC codebooks


class _Net(nn.Module):
    def __init__(self, cfgs: List[ExpertConfig], device: torch.device) -> None:
        super().__init__()
        ph = memonet_pair_hash(cfgs, SCHEMA)
        emb = EmbeddingConfig(embedding_dim=8, pooling="mean")
        self.sparse = SparseArch(SCHEMA, emb, pair_hash=ph, device=device)
        self.experts = nn.ModuleList(
            c.build(F, 8, name=f"e{k}", device=device, pair_hash=ph) for k, c in enumerate(cfgs)
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        inputs = self.sparse(kjt)
        return torch.stack([e(inputs) for e in self.experts], dim=1).sum(-1)  # [B, num_experts]


def _local(value: object) -> torch.Tensor:
    shards = getattr(value, "local_shards", None)
    if shards is None:
        return value.detach().clone()
    (shard,) = shards()  # one rank: the whole table is local
    return shard.tensor.detach().clone()


def test_dmp_one_rank_shards_tables_and_codebooks(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from dtn_torchrec.distributed.sharders import embedding_sharders

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfgs = [
        MemoNetConfig(num_buckets=BUCKETS, output_dim=8),
        MemoNetConfig(num_buckets=BUCKETS, output_dim=8, shrink="gas", codeword_dim=4),
        GDCNConfig(output_dim=8),
        MaskNetConfig(output_dim=8, mlp_dims=[8]),
        DCNConfig(output_dim=8, low_rank=3),
        MLPConfig(output_dim=8, hidden_dims=[8]),
    ]
    lr = 0.5
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = _Net(cfgs, torch.device("meta"))
        sparse_params = list(model.sparse.embedding_bag_collection.parameters())
        sparse_params += [p for e in model.experts[:2] for p in e.codebook.parameters()]
        apply_optimizer_in_backward(torch.optim.SGD, sparse_params, {"lr": lr})
        # Tiny tables would be planned data-parallel; pin the model-parallel types used at scale.
        wanted = {f"t_{name}": "table_wise" for name in SCHEMA.field_names}
        wanted.update(memonet_codebook_e0="row_wise", memonet_codebook_e1="table_wise")
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=1, local_world_size=1, compute_device="cpu"),
            constraints={t: ParameterConstraints(sharding_types=[s]) for t, s in wanted.items()},
        )
        # Ours: TorchRec's stock EBC sharder offers row_wise on CUDA only (sharders.py).
        sharders = embedding_sharders()
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=plan, sharders=sharders
        )
        planned = {t: p.sharding_type for mp in dmp.plan.plan.values() for t, p in mp.items()}
        assert planned == wanted

        state = {k: _local(v) for k, v in dmp.state_dict().items()}
        # Reference init survived meta construction + DMP materialisation.
        field_table = state["sparse.embedding_bag_collection.embedding_bags.t_h.weight"]
        codebook = state["experts.0.codebook.embedding_bags.memonet_codebook_e0.weight"]
        assert abs(float(field_table.std()) - 0.0625) < 0.02
        assert abs(float(codebook.std()) - 0.01) < 0.004
        assert torch.all(state["sparse.input_norm.weight"] == 1)
        for key, value in state.items():
            assert torch.isfinite(value).all(), key
            if key.endswith("bias"):  # every dense bias is zero-initialised
                assert torch.count_nonzero(value) == 0, key
            if key.endswith("norm.weight"):
                assert torch.all(value == 1), key
        glorot = math.sqrt(2.0 / (F * 8 + 8))
        assert abs(float(state["experts.2.projection.weight"].std()) - glorot) < 0.3 * glorot

        reference = _Net(cfgs, torch.device("cpu"))
        reference.load_state_dict(state)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["h", "a", "c", "b"],
            values=torch.tensor([1, 2, 3, 39, 4, 5, 6, 7, 8, 9, 10]),
            lengths=torch.tensor([3, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]),
        )
        out = dmp(kjt)
        expected = reference(kjt)
        torch.testing.assert_close(out, expected)

        out.sum().backward()
        expected.sum().backward()
        after = {k: _local(v) for k, v in dmp.state_dict().items()}
        for key in (
            "experts.0.codebook.embedding_bags.memonet_codebook_e0.weight",
            "experts.1.codebook.embedding_bags.memonet_codebook_e1.weight",
            "sparse.embedding_bag_collection.embedding_bags.t_h.weight",
        ):
            grad = reference.get_parameter(key).grad
            assert grad.abs().sum() > 0, key
            # Fused in-backward SGD on the shard == a plain SGD step on the unsharded table.
            torch.testing.assert_close(after[key], state[key] - lr * grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
