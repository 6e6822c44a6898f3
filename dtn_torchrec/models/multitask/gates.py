"""Gating networks: softmax weights over a set of experts, and the weighted fusion of their outputs."""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from dtn_torchrec.models.experts.layers import Dense


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


GATE_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": _identity,
    "relu": torch.relu,
}


def gate_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function applied to gate logits before the softmax (``none`` or ``relu``)."""
    if name not in GATE_ACTIVATIONS:
        raise ValueError(
            f"unknown gate activation {name!r}; choose one of {sorted(GATE_ACTIVATIONS)}"
        )
    return GATE_ACTIVATIONS[name]


class InputGate(nn.Module):
    """Gate driven by an input vector (MMoE, PLE, DTN ``paper`` variant).

    ``weights = softmax(act(W x + b))`` over the expert axis; ``W`` Glorot-uniform, ``b`` zero
    (TF ``dense`` / ``fully_connected`` defaults of the reference baselines).

    Args:
        in_dim (int): size of the gate input ``x``.
        num_experts (int): number of gated experts ``K``.
        activation (str): applied to the logits before the softmax; ``none`` (MMoE/PLE papers)
            or ``relu`` (the reference TF code of the MMoE baseline).
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        x (torch.Tensor): ``[B, in_dim]``.

    Returns:
        torch.Tensor: ``[B, K]``, non-negative, each row sums to 1.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        activation: str = "none",
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a gate needs at least one expert, got {num_experts}")
        self.linear = Dense(in_dim, num_experts, init="glorot_uniform", device=device)
        self._activation = gate_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._activation(self.linear(x)), dim=-1)


class ExpertOutputGate(nn.Module):
    """Per-expert scalar gates driven by each expert's own output (DTN ``reference`` variant).

    For expert ``k``: ``a_k = act(w_k^T e_k + b_k)``; ``weights = softmax([a_1..a_K])``. This is
    ``K`` independent ``Linear(H, 1)`` layers, stored as one ``[K, H]`` matrix. Initialisation as in
    the reference (TF ``fully_connected``): Xavier-uniform kernels, zero biases.

    Args:
        num_experts (int): ``K``.
        dim (int): expert output size ``H``.
        activation (str): applied to each scalar before the softmax (reference: ``relu``).
        device (Optional[torch.device]): where to create the parameters.

    Call args:
        experts (torch.Tensor): stacked expert outputs ``[B, K, H]``.

    Returns:
        torch.Tensor: ``[B, K]``, each row sums to 1.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        activation: str = "relu",
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"a gate needs at least one expert, got {num_experts}")
        self.weight = nn.Parameter(torch.empty(num_experts, dim, device=device))
        self.bias = nn.Parameter(torch.empty(num_experts, device=device))
        self._activation = gate_activation(activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Xavier-uniform of a Linear(dim -> 1): bound = sqrt(6 / (fan_in + fan_out)).
        bound = math.sqrt(6.0 / (self.weight.shape[1] + 1))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def forward(self, experts: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bkh,kh->bk", experts, self.weight) + self.bias
        return torch.softmax(self._activation(logits), dim=-1)


def weighted_sum(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fuse stacked expert outputs ``[B, K, H]`` with weights ``[B, K]`` into ``[B, H]``."""
    return torch.einsum("bkh,bk->bh", experts, weights)


def gated_sum(
    groups: Sequence[torch.Tensor], weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``sum_k weights[:, k] * e_k`` over the experts of ``groups`` taken in order.

    Args:
        groups (Sequence[torch.Tensor]): ``[B, n_g, H]`` each (an ``ExpertGroup``'s output).
        weights (torch.Tensor): ``[B, K]``, ``K = sum n_g``.
        num_experts (int): ``K`` (a Python int: the train pipeline fx-traces the model).

    Returns:
        torch.Tensor: ``[B, H]``, stored as ``[H, B]`` like the fused experts' outputs.
    """
    stored = torch.cat([g.permute(1, 2, 0) for g in groups])  # [K, H, B]
    return task_mixtures(stored.transpose(1, 2), weights.unsqueeze(0), num_experts)[0]


def task_mixtures(experts: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Every task's gated sum of shared experts: ``out[t] = sum_k weights[t, :, k] * experts[k]``.

    Args:
        experts (torch.Tensor): ``[K, B, H]``, fastest stored as ``[K, H, B]`` (the fused
            experts' layout, which the result keeps for the towers' batched GEMMs).
        weights (torch.Tensor): ``[T, B, K]`` gate weights.
        num_experts (int): ``K`` (a Python int: the train pipeline fx-traces the model).

    Returns:
        torch.Tensor: ``[T, B, H]`` in the promoted dtype of the two (fp32 weights keep the
        sum in fp32 under bf16 autocast).
    """
    # K multiply-adds over [T, H, B] rather than an einsum: that is a batched GEMM over B of
    # [T, K] x [K, H] products, with permuting copies of the experts forward and backward.
    per_expert = weights.transpose(1, 2).contiguous().unsqueeze(2).unbind(1)  # K x [T, 1, B]
    stored = experts.transpose(1, 2).unbind(0)  # K x [H, B]
    mixed = per_expert[0] * stored[0]
    for k in range(1, num_experts):
        mixed = torch.addcmul(mixed, per_expert[k], stored[k])
    return mixed.transpose(1, 2)
