"""What a training run directory records about itself, and the checks made against it.

``dtn-train`` writes into ``output.dir``::

    config.yaml     the resolved run config (every default filled in)
    dataset.json    the training dataset: path, fields with their table sizes, labels
    checkpoints/    see ``distributed.checkpoint``

``--resume``, ``dtn-predict`` and ``dtn-analyze`` compare the config they were given with
``config.yaml`` (the ``model`` section: anything else may change between runs) and refuse a
difference, naming the dotted keys, unless told to allow it; ``--resume`` also compares the
dataset with ``dataset.json``. All of it happens before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml

from dtn_torchrec.atomic_files import write_json_atomic, write_text_atomic
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.train.config import (
    ConfigError,
    RunConfig,
    run_config_from_dict,
    run_config_to_dict,
)

logger: logging.Logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
DATASET_FILE = "dataset.json"
CHECKED_SECTION = "model"
ALLOW_CONFIG_CHANGE_FLAG = "--allow-config-change"
_MAX_LISTED = 6


class RunMismatchError(ValueError):
    """The config or dataset differs from the one the run was trained with."""


def run_dir_of_checkpoints(checkpoint_root: str | os.PathLike) -> Path:
    """The run directory that holds the checkpoint directory ``checkpoint_root``."""
    root = Path(checkpoint_root)
    return root.parent if root.name == CHECKPOINT_DIR else root


def write_run_record(out_dir: str | os.PathLike, cfg: RunConfig, schema: SchemaSpec) -> None:
    """Writes ``config.yaml`` and ``dataset.json`` into ``out_dir`` (rank 0)."""
    out = Path(out_dir)
    write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    write_json_atomic(out / DATASET_FILE, _dataset_record(cfg.data.path, schema))


def _dataset_record(path: str | os.PathLike, schema: SchemaSpec) -> Dict[str, Any]:
    return {
        "path": os.fspath(path),
        "fields": {f.name: f.num_embeddings for f in schema.fields},
        "labels": list(schema.labels),
    }


def differing_keys(saved: Any, current: Any, prefix: str) -> List[str]:
    """Dotted keys under ``prefix`` whose values differ (lists compared item by item)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        keys = list(saved) + [k for k in current if k not in saved]
        return [
            key
            for k in keys
            for key in differing_keys(saved.get(k), current.get(k), f"{prefix}.{k}")
        ]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [
            key
            for i, (a, b) in enumerate(zip(saved, current))
            for key in differing_keys(a, b, f"{prefix}.{i}")
        ]
    return [] if saved == current else [prefix]


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at ``dotted`` below its first part (the section ``tree`` is), or None."""
    for part in dotted.split(".")[1:]:
        if isinstance(tree, Mapping):
            tree = tree.get(part)
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return None
    return tree


def _saved_config(path: Path) -> Dict[str, Any]:
    """The run's config as a resolved dict (defaults added since it was written filled in)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunMismatchError(f"{path}: unreadable run config ({' '.join(str(e).split())})") from e
    if not isinstance(raw, dict):
        raise RunMismatchError(f"{path}: unreadable run config (not a mapping)")
    try:
        return run_config_to_dict(run_config_from_dict(raw))
    except (ConfigError, ValueError, TypeError):
        return raw  # written by another version: compare what it says


def check_model_config(
    run_dir: str | os.PathLike,
    cfg: RunConfig,
    *,
    allow_change: bool,
    flag: str = ALLOW_CONFIG_CHANGE_FLAG,
) -> None:
    """Compares ``cfg``'s model section with the run's ``config.yaml``.

    A run directory without ``config.yaml`` is not checked (a warning says so).

    Args:
        run_dir: the training run's ``output.dir``.
        cfg: the config given now.
        allow_change: warn instead of refusing.
        flag: the option that allows a change (named in the message).

    Raises:
        RunMismatchError: naming the differing dotted keys with both values.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        logger.warning("%s not found: the model config is not checked against the run's", path)
        return
    saved = _saved_config(path).get(CHECKED_SECTION)
    current = run_config_to_dict(cfg)[CHECKED_SECTION]
    keys = differing_keys(saved, current, CHECKED_SECTION)
    if not keys:
        return
    listed = ", ".join(
        f"{k} ({_lookup(saved, k)!r} -> {_lookup(current, k)!r})" for k in keys[:_MAX_LISTED]
    )
    if len(keys) > _MAX_LISTED:
        listed += f", ... ({len(keys)} keys in all)"
    if allow_change:
        logger.warning("model config differs from %s (allowed by %s): %s", path, flag, listed)
        return
    raise RunMismatchError(
        f"the model config differs from the run's {path}: {listed}; pass {flag} to use it anyway"
    )


def check_dataset(
    run_dir: str | os.PathLike, data_path: str | os.PathLike, schema: SchemaSpec
) -> None:
    """Compares ``schema`` (of ``data_path``) with the run's ``dataset.json``: same fields, table
    sizes and labels. A run directory without ``dataset.json`` is not checked.

    Raises:
        RunMismatchError: naming the differing fields.
    """
    path = Path(run_dir) / DATASET_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        saved_fields: Dict[str, Any] = dict(saved["fields"])
        saved_labels: Optional[List[str]] = list(saved["labels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunMismatchError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    current = _dataset_record(data_path, schema)
    issues = [
        f"field {name!r}: {saved_fields.get(name)} -> {current['fields'].get(name)} ids"
        for name in differing_keys(saved_fields, current["fields"], "fields")
        for name in [name.split(".", 1)[1]]
    ]
    if saved_labels != current["labels"]:
        issues.append(f"labels {saved_labels} -> {current['labels']}")
    if issues:
        listed = ", ".join(issues[:_MAX_LISTED])
        if len(issues) > _MAX_LISTED:
            listed += f", ... ({len(issues)} in all)"
        raise RunMismatchError(
            f"{data_path}/schema.json differs from the dataset the run was trained on "
            f"({path}): {listed}"
        )
