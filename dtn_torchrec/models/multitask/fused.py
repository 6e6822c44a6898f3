"""Experts, towers and gates of one kind and shape computed as batched GEMMs.

``E`` modules of the same shape are a Python loop of ``E`` small GEMMs per layer; stacked they
are one GEMM (a shared input times the concatenated weights ``[in, E*out]``) or one
``torch.baddbmm`` (per-module inputs ``[E, B, in]`` times stacked weights ``[E, in, out]``).
The weights are stacked from the modules' own parameters at every call (a copy of the weights,
small next to the ``B``-row activations), so every parameter keeps its name, its own gradient
and its checkpoint key: fusing changes the schedule of the arithmetic, never the model.

Fused here: :class:`MLPExpert` (MMoE / PLE experts), :class:`GDCNExpert` with the ``projection``
structure and parallel :class:`MaskNetExpert` (DTN's modules of one method across groups),
:class:`Tower` (per-task towers), :class:`InputGate`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dtn_torchrec.models.experts.gdcn import GatedCrossLayer, GDCNExpert
from dtn_torchrec.models.experts.masknet import MaskNetExpert
from dtn_torchrec.models.experts.mlp import MLPExpert


def _linears(stack: nn.Sequential) -> List[nn.Linear]:
    return [m for m in stack if isinstance(m, nn.Linear)]


def _same_shapes(layer_lists: Sequence[Sequence[nn.Linear]]) -> bool:
    shapes = {
        tuple((layer.in_features, layer.out_features, layer.bias is not None) for layer in ls)
        for ls in layer_lists
    }
    return len(shapes) == 1


def batched_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], shared: bool
) -> torch.Tensor:
    """``E`` linear maps of stacked weights ``[E, out, in]`` (bias ``[E, out]`` or None).

    Args: x ``[B, in]`` with ``shared`` (one input for all ``E``: one GEMM against the
    concatenated weights) or ``[E, B, in]`` (map ``e`` on ``x[e]``: one ``baddbmm``). Returns
    ``[E, B, out]``. (``shared`` is a flag, not ``x.dim()``: the train pipeline fx-traces the
    model, and traced values cannot steer control flow.)
    """
    num, out = weight.shape[0], weight.shape[1]
    if shared:
        flat_bias = bias.reshape(num * out) if bias is not None else None
        y = nn.functional.linear(x, weight.reshape(num * out, -1), flat_bias)  # [B, E*out]
        return y.view(-1, num, out).transpose(0, 1)
    # y^T = W x^T: the weight gradient (dy^T x) then comes out in the weights' own layout, so
    # DDP's gradient buckets take it without a strided copy.
    x_t = x.transpose(1, 2)  # [E, in, B]
    y_t = torch.bmm(weight, x_t) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, x_t)
    return y_t.transpose(1, 2)


def _stack(layers: Sequence[nn.Linear]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = torch.stack([layer.weight for layer in layers])
    bias = torch.stack([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


def shared_input_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``E`` linear layers on one input. Args: x ``[B, in]``. Returns ``[E, B, out]``."""
    return batched_linear(x, *_stack(layers), shared=True)


def stacked_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
    """``E`` linear layers, layer ``e`` on ``x[e]``. Args: x ``[E, B, in]``. Returns ``[E, B, out]``."""
    return batched_linear(x, *_stack(layers), shared=False)


def fused_sequential(
    x: torch.Tensor, stacks: Sequence[nn.Sequential], shared: bool
) -> torch.Tensor:
    """``E`` ``nn.Sequential`` of the same layout (Linear / elementwise modules) at once.

    The elementwise modules (activations, dropout) of the first stack are applied to the stacked
    activations. Args: x ``[B, in]`` (``shared``) or ``[E, B, in]``. Returns ``[E, B, out]``.
    """
    for position, module in enumerate(stacks[0]):
        if isinstance(module, nn.Linear):
            x = batched_linear(x, *_stack([s[position] for s in stacks]), shared=shared)
            shared = False
        else:
            x = module(x)
    return x


def can_fuse_sequentials(stacks: Sequence[nn.Sequential]) -> bool:
    """True when the stacks have the same layout: Linear at the same positions with the same
    shapes, and the same elementwise module types elsewhere."""
    if len(stacks) < 2 or len({len(s) for s in stacks}) != 1:
        return False
    for modules in zip(*stacks):
        kinds = {type(m) for m in modules}
        if len(kinds) != 1:
            return False
        if isinstance(modules[0], nn.Dropout) and len({m.p for m in modules}) != 1:
            return False
        if not isinstance(modules[0], (nn.Linear, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Dropout)):
            return False
    return _same_shapes([_linears(s) for s in stacks])


# -- experts ------------------------------------------------------------------------------------


def _mlp_forward(experts: Sequence[nn.Module], flat: torch.Tensor) -> torch.Tensor:
    return fused_sequential(flat, [e.mlp.layers for e in experts], shared=True)


def _gdcn_forward(experts: Sequence[nn.Module], flat: torch.Tensor) -> torch.Tensor:
    """``c_{l+1} = c_0 (W_c c_l + b) sigmoid(W_g c_l) + c_l`` for every expert; per layer the
    cross and gate kernels of all experts in one GEMM (``[E, 2N, N]``)."""
    c: torch.Tensor = flat
    for position in range(len(experts[0].cross_layers)):
        layers: List[GatedCrossLayer] = [e.cross_layers[position] for e in experts]
        weight = torch.stack(
            [torch.cat([layer.cross.weight, layer.gate.weight]) for layer in layers]
        )
        cross, gate = batched_linear(c, weight, None, shared=position == 0).chunk(2, dim=-1)
        bias = torch.stack([layer.bias for layer in layers]).unsqueeze(1)  # [E, 1, N]
        c = flat * (cross + bias) * torch.sigmoid(gate) + c  # [E, B, N]
    return stacked_linear(c, [e.projection for e in experts])


def _masknet_forward(experts: Sequence[nn.Module], flat: torch.Tensor) -> torch.Tensor:
    """Parallel MaskNet: the ``E x K`` mask blocks of all experts (they all read ``flat``) as
    one GEMM / ``baddbmm`` per layer, then every expert's MLP."""
    blocks = [b for e in experts for b in e.blocks]  # expert-major: [e0b0, e0b1, e1b0, ...]
    hidden = torch.relu(shared_input_linear(flat, [b.mask.aggregate for b in blocks]))
    mask = stacked_linear(hidden, [b.mask.project for b in blocks])  # [EK, B, N]
    h = stacked_linear(flat * mask, [b.hidden for b in blocks])  # [EK, B, block]
    norm = blocks[0].norm
    weight = torch.stack([b.norm.weight for b in blocks]).unsqueeze(1)  # [EK, 1, block]
    bias = torch.stack([b.norm.bias for b in blocks]).unsqueeze(1)
    h = torch.relu(nn.functional.layer_norm(h, norm.normalized_shape, eps=norm.eps) * weight + bias)
    num_experts, num_blocks = len(experts), len(experts[0].blocks)
    h = (
        h.view(num_experts, num_blocks, -1, h.shape[-1]).permute(0, 2, 1, 3).flatten(2)
    )  # [E, B, K*block]
    return fused_sequential(h, [e.mlp.layers for e in experts], shared=False)


def _masknet_fusable(experts: Sequence[nn.Module]) -> bool:
    if not all(
        type(e) is MaskNetExpert and e.mode == "parallel" and e.emb_norm is None for e in experts
    ):
        return False
    per_block = [[b.mask.aggregate, b.mask.project, b.hidden] for e in experts for b in e.blocks]
    return (
        len({len(e.blocks) for e in experts}) == 1
        and _same_shapes(per_block)
        and len({b.norm.eps for e in experts for b in e.blocks}) == 1
        and all(
            b.norm.elementwise_affine and b.norm.bias is not None for e in experts for b in e.blocks
        )
        and can_fuse_sequentials([e.mlp.layers for e in experts])
    )


def _mlp_fusable(experts: Sequence[nn.Module]) -> bool:
    return all(type(e) is MLPExpert for e in experts) and can_fuse_sequentials(
        [e.mlp.layers for e in experts]
    )


def _gdcn_fusable(experts: Sequence[nn.Module]) -> bool:
    if not all(type(e) is GDCNExpert and e.structure == "projection" for e in experts):
        return False
    return (
        len({len(e.cross_layers) for e in experts}) == 1
        and len({e.cross_layers[0].bias.shape for e in experts}) == 1
        and _same_shapes([[e.projection] for e in experts])
    )


ExpertsForward = Callable[[Sequence[nn.Module], torch.Tensor], torch.Tensor]


def fused_experts_forward(experts: Sequence[nn.Module]) -> Optional[ExpertsForward]:
    """The batched forward of ``experts`` (``(experts, flat [B, F*D]) -> [E, B, H]``) when they
    are of one fusable kind and shape; None otherwise (two or more are needed)."""
    if len(experts) < 2:
        return None
    if _mlp_fusable(experts):
        return _mlp_forward
    if _gdcn_fusable(experts):
        return _gdcn_forward
    if _masknet_fusable(experts):
        return _masknet_forward
    return None


# -- towers and gates ---------------------------------------------------------------------------


def towers_fusable(towers: Sequence[nn.Module]) -> bool:
    """True when the towers (``towers.Tower``) have one shape and activation."""
    return len(towers) >= 2 and can_fuse_sequentials(
        [nn.Sequential(*t.mlp, t.output) for t in towers]
    )


def fused_towers(towers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Every tower on its own input. Args: x ``[T, B, in]``. Returns logits ``[B, T]``."""
    for position, module in enumerate(towers[0].mlp):
        if isinstance(module, nn.Linear):
            x = stacked_linear(x, [t.mlp[position] for t in towers])
        else:
            x = module(x)
    return stacked_linear(x, [t.output for t in towers]).squeeze(-1).transpose(0, 1)


def fused_input_gates(gates: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Input gates (``gates.InputGate``, one activation) reading the same ``x [B, in]`` as one
    GEMM. Returns ``[T, B, K]`` softmax weights."""
    if len({g._activation for g in gates}) != 1:
        raise ValueError("fused input gates need one activation")
    logits = shared_input_linear(x, [g.linear for g in gates])  # [T, B, K]
    return torch.softmax(gates[0]._activation(logits), dim=-1)
