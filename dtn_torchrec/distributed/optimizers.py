"""Sparse (fused in backward) and dense optimisers, the dense LR schedule and grad clipping.

* Sparse: ``apply_sparse_optimizer`` tags every embedding parameter with an optimiser class and
  kwargs *before* DMP; the sharded modules turn that into an FBGEMM TBE whose update runs inside
  the backward, touching only the rows the batch addressed. The classes are TorchRec's
  placeholders (``torchrec.optim``) and ``RowWiseAdagrad``, which accept FBGEMM-only kwargs.
* FBGEMM's CPU TBE implements only exact SGD, Adagrad and row-wise Adagrad and ignores weight
  decay (checked on the pinned stack), so ``check_fused_optimizers`` refuses anything else for
  tables that ``shard_model`` is about to put in fused kernels on CPU. Adam and sparse weight
  decay need CUDA.
* Dense: ``build_dense_optimizer`` gives every parameter without an in-backward optimiser (the
  dense part, which DDP all-reduces, and ``data_parallel`` tables) to a torch optimiser wrapped as
  a ``KeyedOptimizer``, optionally clipped by total norm (``GradientClippingOptimizer``), and
  combines it with ``dmp.fused_optimizer`` so one ``step()`` / ``state_dict()`` covers both.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Tuple, Type

import torch
import torch.nn as nn
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torch.optim.lr_scheduler import LambdaLR
from torchrec import optim as trec_optim
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan
from torchrec.distributed.utils import optimizer_type_to_emb_opt_type
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dtn_torchrec.distributed.config import DenseOptimizerConfig, SparseOptimizerConfig


def sparse_optimizer_spec(
    cfg: SparseOptimizerConfig,
) -> Tuple[Type[torch.optim.Optimizer], Dict[str, Any]]:
    """The optimiser class and kwargs TorchRec maps to an FBGEMM ``EmbOptimType``.

    The kwargs become FBGEMM TBE arguments (``lr`` is renamed ``learning_rate`` by TorchRec).
    """
    cfg.validate()
    kwargs: Dict[str, Any] = {"lr": cfg.lr}
    if cfg.name == "sgd":
        return trec_optim.SGD, kwargs
    kwargs["eps"] = cfg.eps
    if cfg.name == "adagrad":
        return trec_optim.Adagrad, kwargs
    if cfg.name == "rowwise_adagrad":
        if cfg.weight_decay > 0:
            # FBGEMM applies rowwise-Adagrad weight decay only with an explicit mode; L2 matches
            # torch's Adagrad (decay added to the gradient).
            kwargs.update(weight_decay=cfg.weight_decay, weight_decay_mode=WeightDecayMode.L2)
        return RowWiseAdagrad, kwargs
    # adam: FBGEMM's ADAM decays decoupled (AdamW style).
    kwargs.update(beta1=cfg.betas[0], beta2=cfg.betas[1], weight_decay=cfg.weight_decay)
    return trec_optim.Adam, kwargs


def _embedding_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    for sub in module.modules():
        if isinstance(sub, (EmbeddingBagCollection, EmbeddingCollection)):
            yield from sub.parameters()


def apply_sparse_optimizer(module: nn.Module, cfg: SparseOptimizerConfig) -> None:
    """Fuses the sparse optimiser into the backward of every embedding table of ``module``.

    Call on the unsharded model (may be on ``meta``), before planning and DMP.
    """
    optimizer_class, kwargs = sparse_optimizer_spec(cfg)
    params: List[nn.Parameter] = list(_embedding_parameters(module))
    if not params:
        raise ValueError(
            f"{type(module).__name__} has no EmbeddingBagCollection / EmbeddingCollection"
            " parameters to give the sparse optimiser"
        )
    apply_optimizer_in_backward(optimizer_class, params, kwargs)


_CPU_FUSED_OPTIMIZERS = (
    EmbOptimType.EXACT_SGD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
)


def _table_weight(module: nn.Module, table: str) -> nn.Parameter:
    if isinstance(module, ManagedCollisionEmbeddingBagCollection):
        module = module._embedding_module
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bags[table].weight
    if isinstance(module, EmbeddingCollection):
        return module.embeddings[table].weight
    raise TypeError(f"no embedding tables in {type(module).__name__}")


def check_fused_optimizers(module: nn.Module, plan: ShardingPlan, device_type: str) -> None:
    """Refuses fused optimisers the device's FBGEMM kernels cannot run (see module docstring).

    Raises:
        ValueError: naming the table, for a fused table on CPU whose optimiser is not exact
            SGD / Adagrad / row-wise Adagrad or has a non-zero weight decay.
    """
    if device_type != "cpu":
        return
    for module_path, module_plan in plan.plan.items():
        owner = module.get_submodule(module_path)
        for table, sharding in module_plan.items():
            if sharding.compute_kernel != EmbeddingComputeKernel.FUSED.value:
                continue
            weight = _table_weight(owner, table)
            classes = getattr(weight, "_optimizer_classes", [None])
            kwargs = getattr(weight, "_optimizer_kwargs", [{}])[0]
            opt_type = optimizer_type_to_emb_opt_type(classes[0]) if classes[0] else None
            if opt_type is not None and opt_type not in _CPU_FUSED_OPTIMIZERS:
                raise ValueError(
                    f"table {table!r} ({module_path!r}): fused optimiser {opt_type.value!r} is not"
                    " available on CPU (FBGEMM's CPU kernels implement exact SGD, Adagrad and"
                    " row-wise Adagrad); use rowwise_adagrad / adagrad / sgd or a CUDA device"
                )
            if kwargs.get("weight_decay", 0.0):
                raise ValueError(
                    f"table {table!r} ({module_path!r}): FBGEMM's CPU kernels ignore the sparse"
                    " optimiser's weight_decay; set it to 0 or train on a CUDA device"
                )


@dataclass(frozen=True)
class LrSchedule:
    """Per-step multiplier of the dense learning rate (see ``lr_multiplier``)."""

    warmup_steps: int
    decay: str
    decay_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_multiplier(
            step,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            decay_steps=self.decay_steps,
            min_lr_ratio=self.min_lr_ratio,
        )


def lr_multiplier(
    step: int, *, warmup_steps: int, decay: str, decay_steps: int, min_lr_ratio: float
) -> float:
    """Multiplier of the learning rate used by optimiser step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during warm-up; then, with ``t = min(step - warmup_steps,
    decay_steps) / decay_steps``: ``none`` -> 1, ``linear`` -> ``1 - (1 - m) * t``, ``cosine`` ->
    ``m + (1 - m) * (1 + cos(pi * t)) / 2`` where ``m = min_lr_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate decay {decay!r}")


def _dense_factory(cfg: DenseOptimizerConfig) -> functools.partial[torch.optim.Optimizer]:
    if cfg.name in ("adam", "adamw"):
        return functools.partial(
            torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            # One kernel per parameter (CPU and CUDA): ~4x faster than the per-op loop that is
            # the CPU default, which took ~10% of DTN's reference-size step.
            fused=True,
        )
    if cfg.name == "adagrad":
        return functools.partial(
            torch.optim.Adagrad, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return functools.partial(torch.optim.SGD, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates the optimiser's lazily built state without changing parameters or moments.

    ``KeyedOptimizer.load_state_dict`` refuses to load state into an optimiser that has none, so
    a freshly built optimiser could not resume from a checkpoint. One step with zero gradients,
    zero lr and zero weight decay builds the state (zero moments) and leaves the parameters
    unchanged; resetting the step counters makes it identical to a fresh optimiser.
    """
    saved = [(group["lr"], group.get("weight_decay", 0.0)) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        if "weight_decay" in group:
            group["weight_decay"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, (lr, weight_decay) in zip(optimizer.param_groups, saved):
        group["lr"] = lr
        if "weight_decay" in group:
            group["weight_decay"] = weight_decay
        for param in group["params"]:
            param.grad = None
            state = optimizer.state.get(param, {})
            if "step" in state:
                step = state["step"]
                state["step"] = step.zero_() if isinstance(step, torch.Tensor) else 0


class TrainOptimizers(NamedTuple):
    """What ``build_dense_optimizer`` returns.

    Args:
        optimizer: fused sparse + dense; ``step()`` after backward (the fused part already
            updated its rows in backward), ``zero_grad()``, ``state_dict()`` for checkpoints.
        scheduler: dense learning-rate schedule; call ``step()`` once after every optimiser step.
        dense: the dense part (the ``GradientClippingOptimizer`` when clipping is on; its
            ``last_total_grad_norm`` is the norm before clipping).
    """

    optimizer: CombinedOptimizer
    scheduler: LambdaLR
    dense: KeyedOptimizer


def build_dense_optimizer(
    dmp: DistributedModelParallel, cfg: DenseOptimizerConfig
) -> TrainOptimizers:
    """Builds the dense optimiser, its schedule and clipping, combined with the fused one.

    Clipping and the schedule act on the dense optimiser only (including ``data_parallel``
    tables, which it updates); the fused sparse optimiser keeps its own fixed learning rate.
    """
    cfg.validate()
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if not dense_params:
        raise ValueError("the sharded model has no parameter for the dense optimiser")
    torch_optimizer = _dense_factory(cfg)(list(dense_params.values()))
    materialize_state(torch_optimizer)
    wrapper = KeyedOptimizerWrapper(dense_params, lambda _params: torch_optimizer)
    dense: KeyedOptimizer = wrapper
    if cfg.grad_clip_norm is not None:
        dense = GradientClippingOptimizer(
            wrapper, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm
        )
    schedule = LrSchedule(
        warmup_steps=cfg.warmup_steps,
        decay=cfg.decay,
        decay_steps=cfg.decay_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    scheduler = LambdaLR(dense, lr_lambda=schedule)
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return TrainOptimizers(optimizer=optimizer, scheduler=scheduler, dense=dense)
