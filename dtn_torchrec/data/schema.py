"""The dataset schema: the single source of truth shared by `dtn-prepare`, the batch reader and
the model builder. Written as `<dataset>/schema.json` next to the Parquet splits.

Canonical Parquet layout of every split file (``<dataset>/<split>/part-*.parquet``):

* ``sample_id``: ``int64``
* one ``list<int64>`` column per sparse field, named by the field name (e.g. ``"101"``,
  ``"109_14"``). Ids are already mapped (``vocab``: 1..V, 0 = missing/OOV; ``hash``:
  ``1 + (raw mod (num_embeddings - 1))``, 0 reserved for missing; ``raw``: the raw ids,
  ``num_embeddings`` 0). A missing field is an empty list.
* optionally one ``list<float32>`` weight column per field (``FieldSpec.weight_column``), aligned
  element by element with the id list (Ali-CCP's ``feature_value``).
* one ``int8`` column per label (``SchemaSpec.labels``), in task order.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from dtn_torchrec.atomic_files import write_json_atomic

SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1
SAMPLE_ID_COLUMN = "sample_id"

# Ali-CCP field order of the reference code (docs/data-formats.md, the 23 Ali-CCP fields).
ALICCP_FIELDS: List[str] = [
    "101",
    "109_14",
    "110_14",
    "127_14",
    "150_14",
    "121",
    "122",
    "124",
    "125",
    "126",
    "127",
    "128",
    "129",
    "205",
    "206",
    "207",
    "210",
    "216",
    "508",
    "509",
    "702",
    "853",
    "301",
]
ALICCP_LABELS: List[str] = ["click", "conversion"]
# Fields that appear in common_features_*.csv (user side); the rest live in the skeleton.
# They are the first 13 of the reference order.
ALICCP_USER_FIELDS: List[str] = ALICCP_FIELDS[:13]


def weight_column_name(field_name: str) -> str:
    return f"{field_name}__weight"


@dataclass
class FieldSpec:
    """One sparse field: a Parquet ``list<int64>`` column and one embedding table.

    Args:
        name: field name, also the Parquet column and the KJT key.
        num_embeddings: table rows; every mapped id lies in ``[0, num_embeddings)`` (0 for
            ``raw`` ids: no fixed table).
        weight_column: Parquet column with per-id float weights, or None.
        cardinality: distinct ids seen in the training split (after mapping); for ``raw`` ids
            a sketch's estimate.
        mean_length: mean list length over the training split.
        max_length: longest list seen in the training split.
        cardinality_rse: relative standard error of ``cardinality`` (0: an exact count).
    """

    name: str
    num_embeddings: int
    weight_column: Optional[str] = None
    cardinality: int = 0
    mean_length: float = 0.0
    max_length: int = 0
    cardinality_rse: float = 0.0

    @property
    def multi_valued(self) -> bool:
        return self.max_length > 1


@dataclass
class SplitSpec:
    """One split (``train``, ``test``, ``valid``): its files, rows written and rows dropped."""

    rows: int = 0
    files: List[str] = field(default_factory=list)
    dropped: Dict[str, int] = field(default_factory=dict)
    rows_read: int = 0


@dataclass
class SchemaSpec:
    fields: List[FieldSpec]
    labels: List[str]
    splits: Dict[str, SplitSpec] = field(default_factory=dict)
    id_mapping: str = "vocab"
    source_format: str = ""
    min_count: int = 1
    hash_size: int = 0
    summary: Dict[str, Any] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @property
    def field_names(self) -> List[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"field {name!r} not in schema (fields: {self.field_names})")

    def split_files(self, root: str | os.PathLike, split: str) -> List[str]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in schema (splits: {sorted(self.splits)})")
        return [str(Path(root) / p) for p in self.splits[split].files]

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(obj: Dict[str, Any]) -> "SchemaSpec":
        obj = dict(obj)
        obj["fields"] = [FieldSpec(**f) for f in obj["fields"]]
        obj["splits"] = {k: SplitSpec(**v) for k, v in obj.get("splits", {}).items()}
        return SchemaSpec(**obj)

    def save(self, directory: str | os.PathLike) -> Path:
        return write_json_atomic(Path(directory) / SCHEMA_FILE, self.to_json())

    @staticmethod
    def load(directory: str | os.PathLike) -> "SchemaSpec":
        path = Path(directory) / SCHEMA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no schema.json; is this a dataset written by dtn-prepare?"
            )
        try:
            return SchemaSpec.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: malformed schema.json: {e}") from e
