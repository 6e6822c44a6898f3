"""``dtn-analyze`` end to end: checkpoint + evaluation rows -> importance, gate usage, report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from dtn_torchrec.analysis.gates import GateUsage, gate_usage
from dtn_torchrec.analysis.importance import (
    ImportanceConfig,
    ImportanceResult,
    permutation_importance,
)
from dtn_torchrec.analysis.report import write_report
from dtn_torchrec.analysis.rows import EvalRows
from dtn_torchrec.atomic_files import claim_output_dir
from dtn_torchrec.data.reader import ParquetBatchReader
from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.serving.loading import (
    check_run_config,
    load_unsharded_model,
    model_schema,
    resolve_checkpoint,
)
from dtn_torchrec.serving.output import staged_directory
from dtn_torchrec.train.config import RunConfig

TOOL = "dtn-analyze"


@dataclass
class AnalysisOutcome:
    """What :func:`analyze` computed and wrote."""

    importance: ImportanceResult
    gates: Optional[List[GateUsage]]
    files: List[str]


def analyze(
    cfg: RunConfig,
    checkpoint: str | os.PathLike,
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    split: str = "test",
    max_rows: Optional[int] = 20000,
    importance: Optional[ImportanceConfig] = None,
    fields: Optional[List[str]] = None,
    overwrite: bool = False,
    allow_config_change: bool = False,
) -> AnalysisOutcome:
    """Analyses the checkpoint on the first ``max_rows`` rows of ``split`` (one process).

    Needs an initialised one-rank process group (``init_distributed()``) to restore the
    checkpoint.

    Args:
        cfg: the run config the checkpoint was trained with.
        checkpoint: see :func:`serving.loading.resolve_checkpoint`.
        input_dir: a ``dtn-prepare`` dataset with labels for every task.
        output: directory to create (see ``analysis.report``); written only on success.
        split: the split to evaluate on.
        max_rows: rows to use (None: the whole split).
        importance: repeats, seed, batch size (default: ``ImportanceConfig()`` with the config's
            evaluation batch size).
        fields: fields to permute (default: every field).
        overwrite: replace an earlier ``dtn-analyze`` output at ``output`` (nothing else; the
            input, the checkpoint and the training data are always refused).
        allow_config_change: analyse although the model config differs from the training
            run's ``config.yaml`` (default: refuse, naming the keys).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: before anything is written.
    """
    ref = resolve_checkpoint(checkpoint)
    check_run_config(cfg, ref, allow_change=allow_config_change)
    protected = [input_dir, cfg.data.path, ref.path]
    claim_output_dir(output, tool=TOOL, overwrite=overwrite, protected=protected)
    data = SchemaSpec.load(input_dir)
    tasks = list(cfg.model.tasks)
    unlabelled = [t for t in tasks if t not in data.labels]
    if unlabelled:
        raise ValueError(
            f"{input_dir}: no label column for task(s) {unlabelled}; the analysis needs labels"
        )
    schema = model_schema(cfg, data, input_dir)
    unknown = [f for f in fields or [] if f not in schema.field_names]
    if unknown:
        raise ValueError(f"--fields {unknown} are not fields of the model ({schema.field_names})")
    importance = importance or ImportanceConfig(batch_size=cfg.eval_batch_size)
    model = load_unsharded_model(cfg, schema, ref, input_dir)
    reader = ParquetBatchReader(
        os.fspath(input_dir),
        split,
        importance.batch_size,
        use_weights=cfg.data.use_weights,
        prefetch_batches=cfg.data.prefetch_batches,
        fields=schema.field_names,
    )
    rows = EvalRows.from_batches(reader, max_rows)
    result = permutation_importance(
        model, rows, tasks, [data.labels.index(t) for t in tasks], importance, fields
    )
    gates = gate_usage(model, cfg.model.architecture, rows, importance.batch_size)
    settings: Dict[str, Any] = {
        "checkpoint": os.fspath(ref.path.resolve()),
        "step": ref.step,
        "input": os.fspath(input_dir),
        "split": split,
        "model": cfg.model.name,
    }
    with staged_directory(output, tool=TOOL, overwrite=overwrite, protected=protected) as staged:
        files = write_report(staged, result, gates, settings)
    return AnalysisOutcome(importance=result, gates=gates, files=files)
