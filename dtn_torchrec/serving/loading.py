"""Restoring a trained checkpoint for inference, after checking it fits the config and the dataset.

A checkpoint (``distributed.checkpoint.CheckpointManager``) holds the train wrapper's state, whose
model tensors are named ``model.<MultiTaskModel key>``; :class:`InferenceModel` keeps that layout
without the loss, so the same checkpoint loads into a sharded model on any number of ranks (DCP
reshards) or into one unsharded CPU model (export, analysis).

What is checked before any tensor is read (DCP's own errors name neither the field nor the cause):

* the model config against the run's ``config.yaml`` (:func:`check_run_config`): a differing key
  (``model.embedding.pooling``) would score with the same shapes and other numbers.

* the dataset against the training dataset (``data.path`` of the config, when it is readable):
  same fields, same table sizes. The model is built from the *training* schema, because MemoNet's
  crossed fields come from its train-split statistics, which a scoring dataset does not share.
* the model the config builds against the tensors the checkpoint holds (names and shapes, from
  the DCP metadata): a field table of another size is a dataset mismatch; anything else missing,
  extra or of another shape is a config mismatch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.distributed.build import build_sharded_model
from dtn_torchrec.distributed.checkpoint import META_FILE, CheckpointManager
from dtn_torchrec.distributed.checkpoint_files import METADATA_FILE, read_metadata_file
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.model import MultiTaskModel
from dtn_torchrec.train.config import RunConfig
from dtn_torchrec.train.run_dir import CHECKPOINT_DIR, check_model_config, run_dir_of_checkpoints
from dtn_torchrec.train.summary import SUMMARY_FILE

logger: logging.Logger = logging.getLogger(__name__)

# ``CheckpointManager.save`` stores {"model": state_dict, "optim": ...}; DCP flattens the keys.
_MODEL_STATE_PREFIX = "model."
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MAX_LISTED = 4


class CheckpointMismatchError(ValueError):
    """The checkpoint does not hold the model the config describes."""


class SchemaMismatchError(ValueError):
    """The dataset's fields or table sizes differ from the ones the model was trained on."""


@dataclass(frozen=True)
class CheckpointRef:
    """One complete checkpoint: the manager's root directory and the step."""

    root: Path
    step: int

    @property
    def path(self) -> Path:
        return CheckpointManager(self.root).step_path(self.step)


def resolve_checkpoint(path: str | os.PathLike) -> CheckpointRef:
    """Finds the checkpoint ``path`` names.

    Args:
        path: a ``step_<n>`` directory, a checkpoint root (its latest complete step is used), or
            a run directory (``output.dir`` of ``dtn-train``, holding ``checkpoints/``: the step
            its ``summary.json`` selected, i.e. the best valid evaluation, else the latest).

    Raises:
        FileNotFoundError: nothing complete there.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {p}: no such directory")
    match = _STEP_DIR.match(p.name)
    if match:
        if not (p / META_FILE).is_file():
            raise FileNotFoundError(f"--checkpoint {p}: not a complete checkpoint (no {META_FILE})")
        return CheckpointRef(p.parent, int(match.group(1)))
    selected = _selected_step(p)
    if selected is not None:
        root = p / CHECKPOINT_DIR
        if (CheckpointManager(root).step_path(selected) / META_FILE).is_file():
            return CheckpointRef(root, selected)
        logger.warning(
            "%s names step %d, which is not a complete checkpoint in %s: using the latest",
            p / SUMMARY_FILE,
            selected,
            root,
        )
    for root in (p, p / CHECKPOINT_DIR):
        step = CheckpointManager(root).latest_step()
        if step is not None:
            return CheckpointRef(root, step)
    raise FileNotFoundError(
        f"--checkpoint {p}: no complete checkpoint (expected a step_<n> directory, a checkpoint "
        f"directory holding them, or a dtn-train output.dir with {CHECKPOINT_DIR}/)"
    )


def _selected_step(run_dir: Path) -> Optional[int]:
    """The step ``summary.json`` of a finished ``dtn-train`` run selected, or None without one."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["selected"]["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s: no selected step (%s): using the latest checkpoint", path, e)
        return None


def check_run_config(cfg: RunConfig, ref: CheckpointRef, *, allow_change: bool) -> None:
    """Refuses a model config that differs from the training run's ``config.yaml`` (beside the
    checkpoint directory), naming the differing keys; ``allow_change`` makes it a warning.

    Raises:
        RunMismatchError: a ValueError.
    """
    check_model_config(run_dir_of_checkpoints(ref.root), cfg, allow_change=allow_change)


class InferenceModel(nn.Module):
    """A :class:`MultiTaskModel` under the attribute name the train wrapper uses (``model``), so
    its state keys are the checkpoint's; no loss.

    Call args:
        features (KeyedJaggedTensor): one key per schema field.

    Returns:
        torch.Tensor: logits ``[B, T]`` in task order.
    """

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(features)


def _listed(items: List[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown}, ... ({len(items)} in all)"


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def training_schema(cfg: RunConfig) -> Optional[SchemaSpec]:
    """The schema of the dataset the model was trained on (``data.path``), or None if unreadable."""
    try:
        return SchemaSpec.load(cfg.data.path)
    except (OSError, ValueError):
        return None


def check_input_schema(
    trained: SchemaSpec,
    trained_dir: str | os.PathLike,
    data: SchemaSpec,
    data_dir: str | os.PathLike,
) -> None:
    """Checks that ``data`` has the training dataset's fields with the same table sizes.

    Raises:
        SchemaMismatchError: naming each differing field (and both dataset directories).
    """
    issues: List[str] = []
    sizes = {f.name: f.num_embeddings for f in data.fields}
    for f in trained.fields:
        if f.name not in sizes:
            issues.append(f"field {f.name!r} is missing")
        elif sizes[f.name] != f.num_embeddings:
            issues.append(
                f"field {f.name!r} has {sizes[f.name]} ids, the training data {f.num_embeddings}"
            )
    extra = [name for name in sizes if name not in trained.field_names]
    if extra:
        issues.append(f"field(s) {extra} were not trained on")
    if issues:
        raise SchemaMismatchError(
            f"{data_dir}/schema.json differs from the training dataset {trained_dir}: "
            f"{_listed(issues)}; prepare it with dtn-prepare --vocab-from {trained_dir}"
        )


def model_schema(cfg: RunConfig, data: SchemaSpec, data_dir: str | os.PathLike) -> SchemaSpec:
    """The schema to build the model from: the training dataset's, after checking ``data``
    against it; ``data``'s own when the training dataset is not readable here (the checkpoint's
    table shapes are then the only check, see :func:`check_state_matches`)."""
    trained = training_schema(cfg)
    if trained is None:
        logger.warning(
            "training dataset %s (data.path) not readable; checking %s against the checkpoint's "
            "table shapes only (MemoNet's crossed fields then come from its statistics)",
            cfg.data.path,
            data_dir,
        )
        return data
    check_input_schema(trained, cfg.data.path, data, data_dir)
    return trained


def saved_model_shapes(ref: CheckpointRef) -> Dict[str, Tuple[int, ...]]:
    """Global shape of every model tensor in checkpoint ``ref``, keyed like the model's state.

    Raises:
        CorruptCheckpointError: a checkpoint file is missing, truncated, altered or unreadable
            (named; checked against ``meta.json`` before the metadata is read).
    """
    CheckpointManager(ref.root).verify(ref.step)
    metadata = read_metadata_file(ref.path / METADATA_FILE)
    return {
        key[len(_MODEL_STATE_PREFIX) :]: tuple(md.size)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(_MODEL_STATE_PREFIX) and isinstance(md, TensorStorageMetadata)
    }


def _field_tables(model: InferenceModel) -> Tuple[Optional[str], Dict[str, str]]:
    """The state-key prefix of the dataset-sized field tables and ``{state key: field name}``
    (None and ``{}`` when every field has a managed-collision table, sized by the config)."""
    ebc = model.model.sparse_arch.embedding_bag_collection
    if ebc is None:
        return None, {}
    (path,) = [name for name, module in model.named_modules() if module is ebc]
    prefix = f"{path}.embedding_bags."
    return prefix, {
        f"{prefix}{table.name}.weight": table.feature_names[0]
        for table in ebc.embedding_bag_configs()
    }


def check_state_matches(
    model: InferenceModel,
    saved: Mapping[str, Tuple[int, ...]],
    ref: CheckpointRef,
    data_dir: str | os.PathLike,
) -> None:
    """Compares the model's tensors (names, shapes; the model may sit on ``meta``) with ``saved``.

    Raises:
        SchemaMismatchError: a field table of another size, or field tables on one side only.
        CheckpointMismatchError: any other missing, extra or differently shaped tensor.
    """
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    prefix, field_of = _field_tables(model)
    data_issues: List[str] = []
    missing: List[str] = []
    unexpected: List[str] = []
    reshaped: List[str] = []
    for key, shape in expected.items():
        field = field_of.get(key)
        if key not in saved:
            if field:
                data_issues.append(f"dataset field {field!r} has no table in the checkpoint")
            else:
                missing.append(key)
        elif saved[key] != shape:
            if field and saved[key][1:] == shape[1:]:
                data_issues.append(
                    f"field {field!r} has {shape[0]} ids in the dataset, {saved[key][0]} rows in "
                    "the checkpoint"
                )
            else:
                reshaped.append(
                    f"{key} is {list(saved[key])} in the checkpoint, {list(shape)} here"
                )
    for key in saved:
        if key not in expected:
            if prefix is not None and key.startswith(prefix):
                table = key[len(prefix) :].removesuffix(".weight")
                data_issues.append(f"the checkpoint has table {table!r}, the dataset no such field")
            else:
                unexpected.append(key)
    where = f"checkpoint {ref.path}"
    if data_issues:
        raise SchemaMismatchError(
            f"{data_dir} does not match the tables of {where}: {_listed(data_issues)}"
        )
    config_issues = [
        f"{title}: {_listed(items)}"
        for title, items in (
            ("shape differs", reshaped),
            ("missing from the checkpoint", missing),
            ("not in the model", unexpected),
        )
        if items
    ]
    if config_issues:
        raise CheckpointMismatchError(
            f"{where} does not hold the model the config describes; {'; '.join(config_issues)}"
        )


def restore(model: nn.Module, ref: CheckpointRef) -> None:
    """Loads the model tensors of ``ref`` into ``model`` (collective over the default group).

    Raises:
        ValueError: the checkpoint data cannot be read (corrupt or truncated files).
    """
    try:
        CheckpointManager(ref.root).load(model, None, step=ref.step)
    # DCP reports a failure on any rank as CheckpointException, a BaseException.
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(
            f"checkpoint {ref.path}: cannot read its data ({type(e).__name__}: {_one_line(str(e))})"
        ) from e


def load_sharded_model(
    cfg: RunConfig,
    schema: SchemaSpec,
    ref: CheckpointRef,
    device: torch.device,
    batch_size: int,
    data_dir: str | os.PathLike,
) -> DistributedModelParallel:
    """Builds the model as ``dtn-train`` does (meta device, plan, DMP), checks and restores it.

    Every rank of the default process group must call it; any world size loads a checkpoint
    written at any other.

    Args:
        cfg: the run config (model, sharding).
        schema: from :func:`model_schema`.
        ref: the checkpoint.
        device: this rank's device.
        batch_size: rows per batch and rank (the planner's cost model).
        data_dir: the dataset being scored (named in errors).

    Returns:
        The sharded :class:`InferenceModel` in eval mode: ``dmp(kjt) -> logits [B, T]``.
    """
    model = InferenceModel(build_model(cfg.model, schema, device=torch.device("meta")))
    check_state_matches(model, saved_model_shapes(ref), ref, data_dir)
    dmp, _ = build_sharded_model(model, cfg.sharding, schema, device=device, batch_size=batch_size)
    restore(dmp, ref)
    return dmp.eval()


def load_unsharded_model(
    cfg: RunConfig, schema: SchemaSpec, ref: CheckpointRef, data_dir: str | os.PathLike
) -> MultiTaskModel:
    """The whole model on CPU, checked against and restored from ``ref`` (DCP gathers the shards).

    Needs an initialised one-rank default process group (``init_distributed()``).

    Returns:
        The :class:`MultiTaskModel` in eval mode.
    """
    model = InferenceModel(build_model(cfg.model, schema))
    check_state_matches(model, saved_model_shapes(ref), ref, data_dir)
    restore(model, ref)
    return model.model.eval()
