"""Optimiser state of a checkpoint written under another sharding plan.

DCP reshards any state entry whose global shape is the same under both plans: a fused table
moved between row-, column- and table-wise, at any world size, keeps its state. Two cases differ:

* Row-wise Adagrad keeps one accumulator per row *and column shard*: its global shape is
  ``[rows * column_shards]``. It is converted: each row's accumulator over the whole row is the
  column-width-weighted mean of the saved shards' (exact, since each is a mean over its
  columns), then written to every column shard of the new plan (exact without column shards).
* A table moved between a fused optimiser and data-parallel (the dense optimiser, with other
  entries), or any other entry that is missing or shaped differently: the table keeps its freshly
  initialised optimiser state, with a warning naming it. Its weights are restored either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Container, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dtn_torchrec.distributed.checkpoint_files import CheckpointReader, WeightsOnlyLoadPlanner

logger: logging.Logger = logging.getLogger("dtn_torchrec.distributed.checkpoint")

# ``CheckpointManager.save`` stores {"model": ..., "optim": ...}; DCP flattens the keys.
_MODEL_PREFIX = "model."
_STATE_PREFIX = "optim.state."
# Parameter names renamed since checkpoints were first written: (now, before). MemoNet's
# codebooks were sequence ``EmbeddingCollection`` tables before they became pooled
# ``EmbeddingBagCollection`` ones (one id per bag): the same rows and optimiser state.
_RENAMED: Tuple[Tuple[str, str], ...] = ((".codebook.embedding_bags.", ".codebook.embeddings."),)


def saved_name(name: str, saved: Container[str], prefix: str = "") -> str:
    """``name`` as checkpoint metadata ``saved`` holds it (``prefix + name``): itself, or its
    name before a rename (:data:`_RENAMED`) when only that one is there."""
    if prefix + name in saved:
        return name
    for now, before in _RENAMED:
        old = name.replace(now, before)
        if old != name and prefix + old in saved:
            return old
    return name


def table_of(param: str) -> str:
    """``t_f3`` for ``model.ebc.embedding_bags.t_f3.weight``; other parameters by full name."""
    parts = param.split(".")
    if len(parts) >= 3 and parts[-3] in ("embedding_bags", "embeddings"):
        return parts[-2]
    return param


def read_saved_tensor(path: Path, key: str, entry: TensorStorageMetadata) -> torch.Tensor:
    """The whole saved tensor ``key`` on this process (no collective)."""
    target = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
    dcp.load(
        target,
        storage_reader=CheckpointReader(path),
        planner=WeightsOnlyLoadPlanner(),
        no_dist=True,
    )
    return target[key]


def _column_widths(weight: Any) -> Optional[List[int]]:
    """Widths of the saved column shards of a 2-D table weight, in column order; None unless
    every shard holds all rows (TorchRec lays the row-wise state out by column order only then;
    grid sharding is not converted)."""
    if not isinstance(weight, TensorStorageMetadata) or len(weight.size) != 2:
        return None
    widths: Dict[int, int] = {}
    for chunk in weight.chunks:
        if chunk.offsets[0] != 0 or chunk.sizes[0] != weight.size[0]:
            return None
        widths[chunk.offsets[1]] = chunk.sizes[1]
    return [widths[offset] for offset in sorted(widths)]


def _row_state(
    param: str,
    saved_entry: TensorStorageMetadata,
    saved: Mapping[str, Any],
    read: Callable[[], torch.Tensor],
) -> Optional[torch.Tensor]:
    """The whole-row accumulator ``[rows]`` of a saved row-wise entry ``[rows * shards]``."""
    weight = saved.get(_MODEL_PREFIX + param)
    widths = _column_widths(weight)
    if widths is None or len(saved_entry.size) != 1:
        return None
    rows = weight.size[0]
    if saved_entry.size[0] != rows * len(widths):
        return None
    # Column shard i (in column order) holds rows [i * rows, (i + 1) * rows) (TorchRec's
    # get_optimizer_rowwise_shard_metadata_and_global_metadata).
    per_shard = read().view(len(widths), rows)
    weights = torch.tensor(widths, dtype=per_shard.dtype).unsqueeze(1)
    return (per_shard * weights).sum(0) / weights.sum()


def _fill_row_state(value: Any, row_state: torch.Tensor) -> bool:
    """Writes ``row_state [rows]`` into every row (and column shard) of this rank's shards of
    ``value [rows * shards]``; False when ``value`` does not have that layout."""
    if not isinstance(value, ShardedTensor) or len(value.size()) != 1:
        return False
    rows = row_state.numel()
    if value.size(0) % rows:
        return False
    for shard in value.local_shards():
        start = shard.metadata.shard_offsets[0]
        index = torch.arange(start, start + shard.tensor.numel()) % rows
        shard.tensor.copy_(row_state[index].to(shard.tensor.dtype))
    return True


def loadable_optimizer_state(
    optimizer_state: Dict[str, Any], saved: Mapping[str, Any], path: Path
) -> Dict[str, Any]:
    """The part of ``optimizer_state`` (non-empty entries) for DCP to load from checkpoint
    ``path`` (metadata ``saved``); converts row-wise accumulators in place, leaves the rest of
    what the checkpoint cannot fill at its initial value (see the module docstring).
    """
    state: Dict[str, Any] = {}
    for current_param, entries in optimizer_state["state"].items():
        param = saved_name(current_param, saved, _MODEL_PREFIX)
        problems: List[str] = []
        converted: Dict[str, torch.Tensor] = {}
        for name, value in entries.items():
            key = f"{_STATE_PREFIX}{param}.{name}"
            entry = saved.get(key)
            if entry is None:
                problems.append(f"no {name}")
            elif hasattr(value, "size") and isinstance(entry, TensorStorageMetadata):
                if tuple(value.size()) == tuple(entry.size):
                    continue
                row_state = _row_state(
                    param, entry, saved, lambda: read_saved_tensor(path, key, entry)
                )
                if row_state is not None and isinstance(value, ShardedTensor):
                    converted[name] = row_state
                else:
                    problems.append(
                        f"{name} is {list(entry.size)} there, {list(value.size())} here"
                    )
        if problems:
            logger.warning(
                "checkpoint %s: optimiser state of table %s not restored (saved under another"
                " plan or optimiser: %s); its weights are restored, its optimiser state starts"
                " afresh",
                path,
                table_of(param),
                "; ".join(problems),
            )
            continue
        for name, row_state in converted.items():
            if not _fill_row_state(entries[name], row_state):
                raise ValueError(f"{path}: cannot convert {name} of table {table_of(param)}")
        remaining = {name: value for name, value in entries.items() if name not in converted}
        if converted:
            logger.info(
                "checkpoint %s: row-wise optimiser state of table %s converted to this plan",
                path,
                table_of(param),
            )
        if remaining:
            state[param] = remaining
    return {**optimizer_state, "state": state}
