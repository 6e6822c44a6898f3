"""Fused experts, gates and towers (models/multitask/fused.py): the same outputs and gradients
as the module-by-module computation, and the same parameter names (checkpoints keep loading)."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
from torch import nn

from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import model_config_from_dict
from dtn_torchrec.models.multitask import DTN, MMoE
from dtn_torchrec.models.multitask.expert_group import ExpertGroup
from dtn_torchrec.models.multitask.fused import (
    fused_experts_forward,
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


def _unfused(dense: nn.Module) -> nn.Module:
    """A copy of ``dense`` that computes module by module (the reference path)."""
    reference = copy.deepcopy(dense)
    for sub in reference.modules():
        if isinstance(sub, ExpertGroup):
            sub._fused = None
        if isinstance(sub, MMoE):
            sub._fused_heads = False
        if isinstance(sub, DTN):
            sub._fused_positions = [None] * len(sub._fused_positions)
    return reference


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
    grads = {n: p.grad.clone() for n, p in dense.named_parameters()}
    return logits.detach(), grads, inputs.flat.grad.clone()


def _check_fused_equals_unfused(model_section: Dict[str, Any], dim: int) -> nn.Module:
    dense = build_model(model_config_from_dict(model_section), _schema()).dense_arch
    _randomize(dense)
    reference = _unfused(dense)
    got, got_grads, got_input_grad = _outputs_and_grads(dense, dim)
    want, want_grads, want_input_grad = _outputs_and_grads(reference, dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_input_grad, want_input_grad, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(
            got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name
        )
    return dense


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_mmoe_fused_experts_gates_towers_match_the_loop(combine: str) -> None:
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
    )
    assert dense.experts._fused is not None and dense._fused_heads
    # Parameters keep their per-expert, per-gate, per-tower names: checkpoints are unchanged.
    names = {n for n, _ in dense.named_parameters()}
    assert {
        "experts.experts.2.mlp.layers.2.weight",
        "gates.conversion.linear.bias",
        "towers.click.output.weight",
    } <= names


def test_ple_fused_experts_match_the_loop() -> None:
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
    )
    assert any(g._fused is not None for g in dense.modules() if isinstance(g, ExpertGroup))


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_dtn_fused_gdcn_and_mlp_modules_match_the_loop(variant: str) -> None:
    dense = _check_fused_equals_unfused(
        {
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
        },
        dim=4,
    )
    fused = [f is not None for f in dense._fused_positions]
    assert fused == [True] * 6  # GDCN x2, MaskNet x2, MLP x2


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

    assert fused_experts_forward([MLPExpert(6, [4], 3), MLPExpert(6, [5], 3)]) is None
    assert fused_experts_forward([MLPExpert(6, [4], 3)]) is None
    assert fused_experts_forward([MLPExpert(6, [4], 3), MLPExpert(6, [4], 3)]) is not None


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
