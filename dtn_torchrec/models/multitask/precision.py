"""Arithmetic of the dense part: fp32, or bf16 autocast where the hardware has bf16 GEMM.

bf16 runs the experts', gates' and towers' matmuls in bf16 (``torch.autocast``) with fp32 master
weights and fp32 gradients of them; the embedding lookup before it (FBGEMM CPU tables) and the
loss after it stay fp32. Autocast keeps softmax, log and reductions in fp32 by its own op lists.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Literal, Optional

import torch
from torch import nn

from dtn_torchrec.models.experts.memonet import drop_id_dedup

Precision = Literal["fp32", "bf16"]
PRECISION_CHOICES = ("fp32", "bf16", "auto")
# CPU flags of native bf16 dot products (AVX512-BF16) or tiles (AMX); without them oneDNN
# emulates bf16 GEMMs and they run slower than fp32.
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no flags known, so no bf16 claim
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_bf16_gemm(device: torch.device) -> bool:
    """True when ``device`` runs bf16 matmuls natively: CUDA with ``is_bf16_supported()``, or a
    CPU with oneDNN and the ``avx512_bf16`` or ``amx_bf16`` flag."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(_cpu_flags() & set(_BF16_CPU_FLAGS))
    return False


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``fp32`` / ``bf16`` as asked; ``auto`` = ``bf16`` where :func:`has_bf16_gemm`, else fp32.

    Raises:
        ValueError: ``requested`` is not one of :data:`PRECISION_CHOICES`, or ``bf16`` on a
            device that has no bf16 arithmetic at all.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if has_bf16_gemm(device) else "fp32"
    if requested == "bf16" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"precision bf16: no bf16 autocast on device {device}")
    return requested  # type: ignore[return-value]


def dense_autocast(device_type: str, precision: Optional[str]) -> ContextManager[None]:
    """The context the dense part runs in: bf16 autocast for ``bf16``, nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_dense_arch(
    model: nn.Module, precision: str, compile_dense: bool, device: torch.device
) -> Precision:
    """Sets a ``MultiTaskModel``'s dense precision (``precision`` resolved for ``device``) and,
    with ``compile_dense``, compiles its dense arch in place (``nn.Module.compile`` keeps the
    parameter names, so checkpoints do not change); on CUDA, MemoNet looks its ids up without
    deduplication (no host sync in the step). Returns the resolved precision."""
    resolved = resolve_precision(precision, device)
    model.set_dense_precision(resolved, device.type)
    if device.type == "cuda":
        drop_id_dedup(model)
    if compile_dense:
        model.dense_arch.compile()
    return resolved
