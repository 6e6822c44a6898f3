"""Fused experts, gates and towers (models/multitask/fused.py): the same outputs and gradients
as the module-by-module computation, and the same state_dict keys (checkpoints keep loading)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import nn

from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.multitask import MMoE, dtn, expert_group
from dtn_torchrec.models.multitask.expert_group import ExpertGroup
from dtn_torchrec.models.multitask.fused import (
    fuse_experts,
    shared_input_linear,
    stacked_linear,
)
from dtn_torchrec.models.types import ExpertInputs

B = 16
FIELDS = ALICCP_FIELDS[:5]


def _schema() -> SchemaSpec:
    return SchemaSpec(
        fields=[FieldSpec(name=f, num_embeddings=30, max_length=1) for f in FIELDS],
        labels=list(ALICCP_LABELS),
    )


def _inputs(dim: int, seed: int = 0) -> ExpertInputs:
    g = torch.Generator().manual_seed(seed)
    fields = torch.randn(B, len(FIELDS), dim, generator=g)
    return ExpertInputs(fields=fields, flat=fields.flatten(1).requires_grad_(), pair_ids=None)


def _build_unfused(model_section: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The dense arch built module by module (the reference path: nothing fused)."""
    with monkeypatch.context() as patch:
        patch.setattr(expert_group, "fuse_experts", lambda experts: None)
        patch.setattr(dtn, "fuse_experts", lambda experts: None)
        reference = build_model(model_config_from_dict(model_section), _schema()).dense_arch
    for sub in reference.modules():
        if isinstance(sub, MMoE):
            sub._fused_heads = False
    return reference


def _grads_by_key(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Each parameter's gradient under its state_dict key (per-module keys of fused stacks)."""
    values = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.grad)
        grads = {k: v.clone() for k, v in module.state_dict().items()}
        for n, p in module.named_parameters():
            p.copy_(values[n])
    return grads


def _randomize(module: nn.Module) -> None:
    # Non-zero biases everywhere: zero-initialised biases would hide a misplaced bias.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _outputs_and_grads(
    dense: nn.Module, dim: int
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
    inputs = _inputs(dim)
    logits = dense(inputs)
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    return logits.detach(), _grads_by_key(dense), inputs.flat.grad.clone()


def _check_fused_equals_unfused(
    model_section: Dict[str, Any], dim: int, monkeypatch: pytest.MonkeyPatch
) -> nn.Module:
    dense = build_model(model_config_from_dict(model_section), _schema()).dense_arch
    _randomize(dense)
    reference = _build_unfused(model_section, monkeypatch)
    # The fused arch's state_dict has the unfused keys: a strict load fills the reference.
    reference.load_state_dict(dense.state_dict())
    got, got_grads, got_input_grad = _outputs_and_grads(dense, dim)
    want, want_grads, want_input_grad = _outputs_and_grads(reference, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_input_grad, want_input_grad, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(
            got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name
        )
    # And back: the reference's (old-layout) state dict loads into the fused arch.
    reloaded = build_model(model_config_from_dict(model_section), _schema()).dense_arch
    reloaded.load_state_dict(reference.state_dict())
    torch.testing.assert_close(reloaded(_inputs(dim)), want, rtol=1e-5, atol=1e-5)
    return dense


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_mmoe_fused_experts_gates_towers_match_the_loop(
    combine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = _check_fused_equals_unfused(
        {
            "name": "mmoe",
            "tasks": ["click", "conversion"],
            "embedding": {"embedding_dim": 4},
            "tower": {"hidden_dims": [8, 6]},
            "mmoe": {
                "num_experts": 3,
                "combine": combine,
                "expert": {"kind": "mlp", "hidden_dims": [12, 10], "output_dim": 7},
            },
        },
        dim=4,
        monkeypatch=monkeypatch,
    )
    assert dense.experts.fused is not None and dense._fused_heads
    assert dense.experts.fused.mlp.layers[0].weight.shape == (3, 12, 5 * 4)  # [E, out, in]
    # state_dict keeps the per-expert, per-gate, per-tower keys: checkpoints are unchanged.
    assert {
        "experts.experts.2.mlp.layers.2.weight",
        "gates.conversion.linear.bias",
        "towers.click.output.weight",
    } <= set(dense.state_dict())


def test_ple_fused_experts_match_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _check_fused_equals_unfused(
        {
            "name": "ple",
            "tasks": ["click", "conversion"],
            "embedding": {"embedding_dim": 4},
            "tower": {"hidden_dims": [8]},
            "ple": {
                "num_levels": 2,
                "task_experts": 2,
                "shared_experts": 3,
                "expert": {"kind": "mlp", "hidden_dims": [12], "output_dim": 7},
            },
        },
        dim=4,
        monkeypatch=monkeypatch,
    )
    assert any(g.fused is not None for g in dense.modules() if isinstance(g, ExpertGroup))


def _dtn_section(variant: str) -> Dict[str, Any]:
    return {
        "name": "dtn",
        "tasks": ["click", "conversion"],
        "embedding": {"embedding_dim": 4},
        "tower": {"hidden_dims": [8]},
        "dtn": {
            "variant": variant,
            "modules_per_method": 2,
            "tsn": {"conversion": ["click"]},
            "methods": [
                {"kind": "gdcn", "output_dim": 6, "num_cross_layers": 2},
                {
                    "kind": "masknet",
                    "output_dim": 6,
                    "mask_hidden_dim": 8,
                    "mask_block_dim": 5,
                    "num_mask_blocks": 2,
                    "mlp_dims": [8, 6],
                },
                {"kind": "mlp", "hidden_dims": [9], "output_dim": 6},
            ],
        },
    }


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_dtn_fused_gdcn_and_mlp_modules_match_the_loop(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = _check_fused_equals_unfused(_dtn_section(variant), dim=4, monkeypatch=monkeypatch)
    assert sorted(dense.fused_positions) == [str(k) for k in range(6)]  # GDCN, MaskNet, MLP x2
    assert not any(len(group.experts) for group in dense.groups.values())
    # Parameters are the stacks: [G, 2N, N] cross + gate kernels of the 3 groups.
    assert dense.fused_positions["0"].cross_layers[0].weight.shape == (3, 40, 20)


def test_dcp_checkpoint_of_the_unfused_layout_loads_into_the_fused_model(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DCP loads in place into ``state_dict()``'s tensors: the per-module views of the stacks."""
    import torch.distributed.checkpoint as dcp

    section = _dtn_section("reference")
    old = _build_unfused(section, monkeypatch)
    _randomize(old)
    dcp.save(old.state_dict(), checkpoint_id=str(tmp_path / "old"), no_dist=True)
    fused = build_model(model_config_from_dict(section), _schema()).dense_arch
    state = fused.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "old"), no_dist=True)
    fused.load_state_dict(state)
    want = old(_inputs(4))
    torch.testing.assert_close(fused(_inputs(4)), want, rtol=1e-5, atol=1e-5)
    # And the fused model's checkpoint loads into the unfused layout.
    dcp.save(fused.state_dict(), checkpoint_id=str(tmp_path / "fused"), no_dist=True)
    back = _build_unfused(section, monkeypatch)
    state = back.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "fused"), no_dist=True)
    back.load_state_dict(state)
    torch.testing.assert_close(back(_inputs(4)), want, rtol=1e-5, atol=1e-5)


def test_meta_fused_stacks_are_initialised_per_module() -> None:
    """DMP re-initialises a meta model with each module's reset_parameters: every [out, in]
    slot of a stack gets the Glorot bound of its own fans (not of the whole stack)."""
    from dtn_torchrec.models.experts.gdcn import GDCNExpert

    n, experts = 64, 3
    fused = fuse_experts([GDCNExpert(n, 8, device=torch.device("meta")) for _ in range(experts)])
    layer = fused.cross_layers[0]
    layer.weight = nn.Parameter(torch.full(layer.weight.shape, float("nan")))
    layer.reset_parameters()
    bound = (6.0 / (n + n)) ** 0.5  # Glorot-uniform of one [N, N] kernel
    assert layer.weight.abs().max() <= bound
    # A [2N, N] cross + gate kernel initialised as one would stay below sqrt(6 / 3N).
    for e in range(experts):
        for kernel in layer.weight[e].chunk(2):
            assert kernel.abs().max() > (6.0 / (3 * n)) ** 0.5


def test_stacked_and_shared_linear_are_per_layer_linears() -> None:
    layers = [nn.Linear(5, 3) for _ in range(4)]
    x = torch.randn(7, 5)
    xs = torch.randn(4, 7, 5)
    torch.testing.assert_close(
        shared_input_linear(x, layers), torch.stack([layer(x) for layer in layers])
    )
    torch.testing.assert_close(
        stacked_linear(xs, layers), torch.stack([layer(xs[e]) for e, layer in enumerate(layers)])
    )


def test_experts_of_different_shapes_are_not_fused() -> None:
    from dtn_torchrec.models.experts.mlp import MLPExpert

    assert fuse_experts([MLPExpert(6, [4], 3), MLPExpert(6, [5], 3)]) is None
    assert fuse_experts([MLPExpert(6, [4], 3)]) is None
    assert fuse_experts([MLPExpert(6, [4], 3), MLPExpert(6, [4], 3)]) is not None


def test_fused_weight_gradients_arrive_in_the_weights_layout() -> None:
    """DDP copies (and warns about) gradients whose strides differ from the parameter's."""
    for fused in (shared_input_linear, stacked_linear):
        layers = [nn.Linear(5, 3) for _ in range(3)]
        contiguous: List[bool] = []
        for layer in layers:
            for p in layer.parameters():
                p.register_hook(lambda g: contiguous.append(g.is_contiguous()))
        x = torch.randn(7, 5) if fused is shared_input_linear else torch.randn(3, 7, 5)
        (fused(x, layers) * torch.randn(3, 7, 3)).sum().backward()
        assert len(contiguous) == 2 * len(layers) and all(contiguous), fused.__name__
