"""``dtn-model-stats``: parameter counts and dense FLOPs per sample of configured models.

    dtn-model-stats --config configs/dtn_aliccp.yaml configs/mmoe_aliccp.yaml \
        [--schema DIR] [--json]

Without ``--schema`` the tables take the Ali-CCP reference sizes, so no dataset is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from dtn_torchrec.data.schema import SchemaSpec
from dtn_torchrec.models.config import ModelConfig, model_config_from_dict
from dtn_torchrec.models.stats import aliccp_reference_schema, model_stats


def load_model_section(path: str) -> ModelConfig:
    """The ``model:`` section of a config file; errors name the file and the dotted key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read config: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path}: no 'model:' section")
    try:
        return model_config_from_dict(raw["model"])
    except ValueError as e:
        raise ValueError(f"{path}: model.{e}") from e


def _table(rows: List[Dict[str, object]]) -> str:
    header = (
        "config",
        "model",
        "embedding params",
        "dense params",
        "fwd MFLOP/sample",
        "fwd+bwd MFLOP/sample",
    )
    body = [
        (
            str(r["config"]),
            str(r["model"]),
            f"{r['embedding_params']:,}",
            f"{r['dense_params']:,}",
            f"{r['forward_flops_per_sample'] / 1e6:,.2f}",
            f"{r['train_flops_per_sample'] / 1e6:,.2f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    # text columns left-aligned, numbers right-aligned
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in [header] + body
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dtn-model-stats",
        description="Parameter counts (embedding vs dense) and dense FLOPs per sample of each "
        "model.",
    )
    parser.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="FILE",
        help="config file(s) with a model: section",
    )
    parser.add_argument(
        "--schema",
        metavar="DIR",
        help="dataset directory with schema.json (default: Ali-CCP reference table sizes)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="batch used to count FLOPs (default: 8)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per line instead of a table"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        schema = SchemaSpec.load(args.schema) if args.schema else aliccp_reference_schema()
        rows: List[Dict[str, object]] = []
        for path in args.config:
            cfg = load_model_section(path)
            try:
                stats = model_stats(cfg, schema, batch_size=args.batch_size)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            rows.append({"config": path, "model": cfg.name, **stats.to_dict()})
    except (OSError, ValueError) as e:
        print(f"dtn-model-stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"tables: {'schema of ' + args.schema if args.schema else 'Ali-CCP reference sizes'}")
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
