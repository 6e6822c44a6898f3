"""Experts, towers and gates of one kind and shape computed as batched GEMMs.

``E`` modules of the same shape are a Python loop of ``E`` small GEMMs per layer; stacked they
are one GEMM (a shared input times the concatenated weights ``[in, E*out]``) or one
``torch.baddbmm`` (per-module inputs ``[E, B, in]`` times stacked weights ``[E, in, out]``).

Experts (:class:`MLPExpert` of MMoE / PLE, :class:`GDCNExpert` with the ``projection``
structure and parallel :class:`MaskNetExpert`, DTN's modules of one method across groups) are
replaced by a fused module that OWNS their weights stacked (``[E, out, in]`` parameters): no copy
of the weights forward, no scatter of their gradients backward, one bf16 cast per stack under
autocast. :func:`keep_module_keys` keeps the per-module ``state_dict`` keys, so checkpoints of
either layout load. Towers and gates (small) keep their own parameters and are stacked per call.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dtn_torchrec.models.experts.gdcn import GDCNExpert
from dtn_torchrec.models.experts.layers import Dense, init_dense_weight
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
    ``[E, B, out]``, stored as ``[E, out, B]`` by both paths. (``shared`` is a flag, not
    ``x.dim()``: the train pipeline fx-traces the model, and traced values cannot steer control
    flow.)
    """
    num, out = weight.shape[0], weight.shape[1]
    if shared:
        # y^T = W x^T as below, so both paths store [E, out, B]: the next stacked layer then
        # reads it without a copy, and an activation's backward sees its gradient in its own
        # layout (mixed layouts cost a strided copy or a slow elementwise loop each).
        w = weight.reshape(num * out, -1)
        y_t = torch.mm(w, x.t()) if bias is None else torch.addmm(bias.view(-1, 1), w, x.t())
        return y_t.view(num, out, -1).transpose(1, 2)
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


def can_fuse_sequentials(stacks: Sequence[nn.Sequential]) -> bool:
    """True when the stacks have the same layout: :class:`Dense` at the same positions with the
    same shapes, and the same elementwise module types elsewhere."""
    if len(stacks) < 2 or len({len(s) for s in stacks}) != 1:
        return False
    for modules in zip(*stacks):
        kinds = {type(m) for m in modules}
        if len(kinds) != 1:
            return False
        if isinstance(modules[0], nn.Dropout) and len({m.p for m in modules}) != 1:
            return False
        if not isinstance(modules[0], (Dense, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Dropout)):
            return False
    return _same_shapes([_linears(s) for s in stacks])


# -- experts: fused modules that own stacked parameters ---------------------------------------

# One source of a stacked parameter's slot: (module index, parameter path in that module, rows).
# A slot is the concatenation (dim 0) of its sources; ``sources[name][e]`` are slot ``e``'s.
Part = Tuple[int, str, int]
Sources = Dict[str, List[List[Part]]]


def _stack_param(modules: Sequence[nn.Module], slots: Sequence[Sequence[Tuple[int, str]]]):
    """``(parameter [E, rows, ...], sources)``: slot ``e`` is the concatenation of the named
    parameters of ``slots[e]``; on ``meta`` the result is ``meta`` too (DMP initialises it)."""
    tensors = [[modules[i].get_parameter(path).detach() for i, path in slot] for slot in slots]
    value = torch.stack([torch.cat(ts) if len(ts) > 1 else ts[0] for ts in tensors])
    parts = [
        [(i, path, t.shape[0]) for (i, path), t in zip(slot, ts)]
        for slot, ts in zip(slots, tensors)
    ]
    return nn.Parameter(value.clone()), parts


class StackedLinear(nn.Module):
    """``E`` :class:`Dense` maps as one: weight ``[E, out, in]``, bias ``[E, out]`` or None.

    Args:
        modules (Sequence[nn.Module]): the modules the layers come from.
        paths (Sequence[Tuple[int, str]]): per slot ``e``, (module index, path of its Dense).

    Call args:
        x (torch.Tensor): ``[B, in]`` with ``shared`` or ``[E, B, in]``.
        shared (bool): one input for all maps.

    Returns:
        torch.Tensor: ``[E, B, out]``.
    """

    def __init__(self, modules: Sequence[nn.Module], paths: Sequence[Tuple[int, str]]) -> None:
        super().__init__()
        first: Dense = modules[paths[0][0]].get_submodule(paths[0][1])
        self.init = first.init
        self.sources: Sources = {}
        self.weight, self.sources["weight"] = _stack_param(
            modules, [[(i, f"{path}.weight")] for i, path in paths]
        )
        if first.bias is not None:
            self.bias, self.sources["bias"] = _stack_param(
                modules, [[(i, f"{path}.bias")] for i, path in paths]
            )
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        for e in range(self.weight.shape[0]):  # per slot: the fans of one [out, in] kernel
            init_dense_weight(self.weight[e], self.init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        return batched_linear(x, self.weight, self.bias, shared=shared)


def _with_prefix(prefix: str, sources: Sources) -> Sources:
    return {f"{prefix}{name}": slots for name, slots in sources.items()}


class StackedSequential(nn.Module):
    """``E`` ``nn.Sequential`` of one layout (:class:`Dense` / elementwise modules) as one.

    The elementwise modules (activations, dropout) of the first are applied to the stacked
    activations.

    Args:
        modules (Sequence[nn.Module]): module ``e`` holds stack ``e`` at ``path``.
        path (str): path of the ``nn.Sequential`` in each module.

    Call args:
        x (torch.Tensor): ``[B, in]`` with ``shared`` or ``[E, B, in]``.
        shared (bool): one input for all stacks.

    Returns:
        torch.Tensor: ``[E, B, out]``.
    """

    def __init__(self, modules: Sequence[nn.Module], path: str) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        self.sources: Sources = {}
        for position, module in enumerate(modules[0].get_submodule(path)):
            if isinstance(module, nn.Linear):
                stacked = StackedLinear(
                    modules, [(i, f"{path}.{position}") for i in range(len(modules))]
                )
                self.sources.update(_with_prefix(f"layers.{position}.", stacked.sources))
                module = stacked
            layers.append(module)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        for module in self.layers:
            if isinstance(module, StackedLinear):
                x = module(x, shared=shared)
                shared = False
            else:
                x = module(x)
        return x


class FusedMLPExperts(nn.Module):
    """``E`` :class:`MLPExpert` of one shape. Call args: flat ``[B, F*D]``. Returns ``[E, B, H]``."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.mlp = StackedSequential(experts, "mlp.layers")
        self.sources: Sources = _with_prefix("mlp.", self.mlp.sources)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        return self.mlp(flat, shared=True)


class StackedGatedCross(nn.Module):
    """Layer ``l`` of ``E`` GDCN experts: cross and gate kernels ``[E, 2N, N]``, bias ``[E, N]``."""

    def __init__(self, experts: Sequence[nn.Module], layer: int) -> None:
        super().__init__()
        self.bias_init: str = experts[0].cross_layers[layer].bias_init
        path = f"cross_layers.{layer}"
        self.sources: Sources = {}
        self.weight, self.sources["weight"] = _stack_param(
            experts,
            [
                [(e, f"{path}.cross.weight"), (e, f"{path}.gate.weight")]
                for e in range(len(experts))
            ],
        )
        self.bias, self.sources["bias"] = _stack_param(
            experts, [[(e, f"{path}.bias")] for e in range(len(experts))]
        )

    def reset_parameters(self) -> None:
        rows = self.weight.shape[2]
        for e in range(self.weight.shape[0]):
            init_dense_weight(self.weight[e, :rows], "glorot_uniform")  # cross
            init_dense_weight(self.weight[e, rows:], "glorot_uniform")  # gate
        if self.bias_init == "uniform":
            nn.init.uniform_(self.bias, 0.0, 1.0)
        else:
            nn.init.zeros_(self.bias)

    def forward(self, c0_t: torch.Tensor, c_t: torch.Tensor, shared: bool) -> torch.Tensor:
        """``c0 (W_c c + b) sigmoid(W_g c) + c``, batch last (``c^T``, the layout the GEMM
        ``W c^T`` writes), in the GEMM's dtype (bf16 under autocast).

        Args: c0_t ``[N, B]``; c_t ``[N, B]`` (``shared``: the first layer, ``c = c0``) or
        ``[E, N, B]``. Returns ``[E, N, B]``.
        """
        num, rows = self.weight.shape[0], self.weight.shape[1]
        if shared:
            y = torch.mm(self.weight.view(num * rows, -1), c_t).view(num, rows, -1)
        else:
            y = torch.bmm(self.weight, c_t)  # [E, 2N, B]
        cross, gate = y.chunk(2, dim=1)  # one split: its backward is one cat, not two pads
        # One dtype and one layout for the whole chain: no fp32 [E, N, B] temporaries (an fp32
        # bias would promote them) and no casts back to bf16 for the next GEMM.
        c0 = c0_t.to(y.dtype)
        gated = c0 * (cross + self.bias.to(y.dtype).unsqueeze(-1))
        return torch.addcmul(c0 if shared else c_t, gated, torch.sigmoid(gate))


class FusedGDCNExperts(nn.Module):
    """``E`` :class:`GDCNExpert` (``projection``): per layer the cross and gate kernels of all
    experts in one GEMM. Call args: flat ``[B, N]``. Returns ``[E, B, H]``."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.cross_layers = nn.ModuleList(
            StackedGatedCross(experts, layer) for layer in range(len(experts[0].cross_layers))
        )
        self.projection = StackedLinear(experts, [(e, "projection") for e in range(len(experts))])
        self.sources: Sources = _with_prefix("projection.", self.projection.sources)
        for layer, cross in enumerate(self.cross_layers):
            self.sources.update(_with_prefix(f"cross_layers.{layer}.", cross.sources))

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        flat_t = flat.t().contiguous()  # [N, B]: the layers run batch last
        c_t = flat_t
        for layer, cross in enumerate(self.cross_layers):
            c_t = cross(flat_t, c_t, shared=layer == 0)
        return self.projection(c_t.transpose(1, 2), shared=False)  # reads [E, N, B] as is


class FusedMaskNetExperts(nn.Module):
    """``E`` parallel :class:`MaskNetExpert`: the ``E x K`` mask blocks (they all read ``flat``)
    as one GEMM / ``baddbmm`` per layer, then every expert's MLP.
    Call args: flat ``[B, N]``. Returns ``[E, B, H]``."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.num_experts, self.num_blocks = len(experts), len(experts[0].blocks)
        # Expert-major slots: [e0b0, e0b1, e1b0, ...].
        blocks = [
            (e, f"blocks.{k}") for e in range(self.num_experts) for k in range(self.num_blocks)
        ]
        self.aggregate = StackedLinear(experts, [(e, f"{b}.mask.aggregate") for e, b in blocks])
        self.project = StackedLinear(experts, [(e, f"{b}.mask.project") for e, b in blocks])
        self.hidden = StackedLinear(experts, [(e, f"{b}.hidden") for e, b in blocks])
        norm: nn.LayerNorm = experts[0].blocks[0].norm
        self.eps: float = norm.eps
        self.sources: Sources = {}
        self.norm_weight, self.sources["norm_weight"] = _stack_param(
            experts, [[(e, f"{b}.norm.weight")] for e, b in blocks]
        )
        self.norm_bias, self.sources["norm_bias"] = _stack_param(
            experts, [[(e, f"{b}.norm.bias")] for e, b in blocks]
        )
        self.mlp = StackedSequential(experts, "mlp.layers")
        for name in ("aggregate", "project", "hidden", "mlp"):
            self.sources.update(_with_prefix(f"{name}.", getattr(self, name).sources))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.norm_weight)
        nn.init.zeros_(self.norm_bias)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.aggregate(flat, shared=True))  # [EK, B, agg]
        mask_t = self.project(hidden, shared=False).transpose(1, 2)  # [EK, N, B], as stored
        # The masked input batch last like the mask (one layout: a product of [B, N] and
        # [N, B]-major operands runs a strided loop) and in its dtype (bf16 under autocast:
        # the product feeds a GEMM that would cast an fp32 product back to bf16 anyway).
        flat_t = flat.t().to(mask_t.dtype, memory_format=torch.contiguous_format)  # [N, B]
        h = self.hidden((flat_t * mask_t).transpose(1, 2), shared=False)  # [EK, B, block]
        h = nn.functional.layer_norm(h, h.shape[-1:], eps=self.eps)
        h = torch.relu(h * self.norm_weight.unsqueeze(1) + self.norm_bias.unsqueeze(1))
        h = (
            h.view(self.num_experts, self.num_blocks, -1, h.shape[-1])
            .permute(0, 2, 1, 3)
            .flatten(2)
        )  # [E, B, K*block]
        return self.mlp(h, shared=False)


def _masknet_fusable(experts: Sequence[nn.Module]) -> bool:
    if not all(
        type(e) is MaskNetExpert and e.mode == "parallel" and e.emb_norm is None for e in experts
    ):
        return False
    per_block = [[b.mask.aggregate, b.mask.project, b.hidden] for e in experts for b in e.blocks]
    return (
        len({len(e.blocks) for e in experts}) == 1
        and _same_shapes(per_block)
        and all(isinstance(layer, Dense) for layers in per_block for layer in layers)
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
        and len({layer.bias_init for e in experts for layer in e.cross_layers}) == 1
        and _same_shapes([[e.projection] for e in experts])
    )


def fuse_experts(experts: Sequence[nn.Module]) -> Optional[nn.Module]:
    """A module that owns the stacked parameters of ``experts`` (copied; ``meta`` stays
    ``meta``) and computes them all (``flat [B, F*D] -> [E, B, H]``), when they are two or more
    of one fusable kind and shape; None otherwise. Its ``sources`` map each of its parameters to
    the experts' (see :func:`keep_module_keys`)."""
    if len(experts) < 2:
        return None
    if _mlp_fusable(experts):
        return FusedMLPExperts(experts)
    if _gdcn_fusable(experts):
        return FusedGDCNExperts(experts)
    if _masknet_fusable(experts):
        return FusedMaskNetExperts(experts)
    return None


def keep_module_keys(
    owner: nn.Module, fused_path: str, fused: nn.Module, module_paths: Sequence[str]
) -> None:
    """``owner.state_dict()`` lists the fused parameters under the per-module keys they were
    stacked from (views of the stacked tensors, so loading into them in place, as DCP does,
    fills the stacked parameters), and ``owner.load_state_dict`` stacks per-module keys back.

    Args:
        owner (nn.Module): the module holding ``fused`` at ``fused_path``.
        fused_path (str): path of ``fused`` in ``owner``.
        fused (nn.Module): a module of :func:`fuse_experts` (its ``sources``).
        module_paths (Sequence[str]): path in ``owner`` of module ``i`` of the sources.
    """
    sources: Sources = fused.sources

    def keys(prefix: str, slot: List[Part]) -> List[str]:
        return [f"{prefix}{module_paths[i]}.{path}" for i, path, _ in slot]

    def to_module_keys(module: nn.Module, state_dict: Dict[str, Any], prefix: str, _meta) -> None:
        for name, slots in sources.items():
            stacked = state_dict.pop(f"{prefix}{fused_path}.{name}", None)
            if stacked is None:
                continue
            for value, slot in zip(stacked, slots):
                for key, piece in zip(keys(prefix, slot), value.split([r for *_, r in slot])):
                    state_dict[key] = piece

    def from_module_keys(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *_) -> None:
        for name, slots in sources.items():
            slot_keys = [keys(prefix, slot) for slot in slots]
            if all(k in state_dict for ks in slot_keys for k in ks):
                state_dict[f"{prefix}{fused_path}.{name}"] = torch.stack(
                    [torch.cat([state_dict.pop(k) for k in ks]) for ks in slot_keys]
                )

    owner.register_state_dict_post_hook(to_module_keys)
    owner.register_load_state_dict_pre_hook(from_module_keys)


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
