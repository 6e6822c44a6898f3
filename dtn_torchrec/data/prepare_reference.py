"""A plain-Python, line-by-line raw Ali-CCP reader: the baseline of the `dtn-prepare` benchmark
and an independent check of its output in tests.

It works the way the original readers do (mrchor/FDN ``data/aliccp/reader.py``): load the
common-features file into a dict of key -> feature-list text; then for every skeleton line split
the text, drop the click = 0 / conversion = 1 pair, append the common feature-list text of its
``common_feature_index``, split every feature at ``\\x01``/``\\x02``/``\\x03``, group ids by field
and map each id with a dict lookup. Raw id 0 (missing) is left out, as in ``dtn-prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from dtn_torchrec.data.schema import ALICCP_FIELDS


@dataclass
class ReferenceRow:
    """One joined sample: per field the mapped ids and their feature values, in source order."""

    sample_id: int
    click: int
    conversion: int
    ids: Dict[str, List[int]]
    weights: Dict[str, List[float]]


def reference_parse_raw(
    skeleton_path: str,
    common_path: str,
    fields: Sequence[str] = ALICCP_FIELDS,
    vocab: Optional[Mapping[str, Mapping[int, int]]] = None,
    hash_sizes: Optional[Mapping[str, int]] = None,
) -> Iterator[ReferenceRow]:
    """Yields the rows of a raw Ali-CCP split.

    Args:
        skeleton_path: ``sample_skeleton_<split>.csv``.
        common_path: ``common_features_<split>.csv``.
        fields: field names, in output order.
        vocab: per field, raw id -> mapped id (absent ids map to 0).
        hash_sizes: per field, table size for ``1 + raw mod (size - 1)``.
        Without ``vocab`` and ``hash_sizes`` ids stay raw.
    """
    common: Dict[str, str] = {}
    with open(common_path) as f:
        for line in f:
            key, _, feature_list = line.rstrip("\r\n").split(",")
            common[key] = feature_list
    with open(skeleton_path) as f:
        for line in f:
            sample_id, click, conversion, key, _, feature_list = line.rstrip("\r\n").split(",")
            if click == "0" and conversion == "1":
                continue
            joined = feature_list + "\x01" + common[key]
            ids: Dict[str, List[int]] = {name: [] for name in fields}
            weights: Dict[str, List[float]] = {name: [] for name in fields}
            for feature in joined.split("\x01"):
                field, id_value = feature.split("\x02")
                text_id, value = id_value.split("\x03")
                feat_id = int(text_id)
                if feat_id == 0:
                    continue
                if vocab is not None:
                    feat_id = vocab[field].get(feat_id, 0)
                elif hash_sizes is not None:
                    feat_id = 1 + feat_id % (hash_sizes[field] - 1)
                ids[field].append(feat_id)
                weights[field].append(float(value))
            yield ReferenceRow(int(sample_id), int(click), int(conversion), ids, weights)
