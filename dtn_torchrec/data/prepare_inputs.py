"""Which input files `dtn-prepare` reads for which split.

* ``aliccp-raw``: ``sample_skeleton_<split>.csv`` with ``common_features_<split>.csv`` (the Tianchi
  names; compressed as ``.csv.gz``, ``.csv.bz2``, ``.csv.zst`` or ``.csv.lz4`` too), in ``--input``
  or in ``--input/<split>/`` (the NVIDIA Merlin layout); or ``--input`` is one skeleton file and
  its common-features file is the sibling whose name has ``common_features`` in place of
  ``sample_skeleton``.
* other formats: every data file in ``--input`` whose name contains ``train``, ``test``, or
  ``val``/``valid``/``validation``/``dev`` as a word (e.g. ``train.csv``, ``train_small.txt``,
  ``ali_ccp_val_sample.csv``, ``ctr_cvr.dev``), else every data file in ``--input/<split>/``; or
  ``--input`` is one file. A data file ends in ``.csv`` or ``.txt`` or in a split name (AITM's
  ``ctr_cvr.train``), optionally followed by a compression suffix (``.gz``, ``.bz2``, ``.zst``,
  ``.lz4``); other files (``train.csv.bak``, ``train.parquet``) are listed as ignored. Several
  files of one split are read in name order.

``--split NAME`` restricts a directory to that split, and names the split of a single file
whose name does not say it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

SPLIT_ORDER = ("train", "valid", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "test": "test",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "dev": "valid",
}
_VALID_WORD = re.compile(r"(?<![a-z])(val|valid|validation|dev)(?![a-z])")
_RAW_SPLITS = ("train", "valid", "test")
DATA_SUFFIXES = (".csv", ".txt")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")


@dataclass
class SourceFile:
    """One input file of a split; ``common_path`` is the raw Ali-CCP common-features file."""

    path: str
    split: str
    common_path: Optional[str] = None


@dataclass
class Sources:
    """The input files per split (in SPLIT_ORDER) and the files passed over (paths)."""

    files: Dict[str, List[SourceFile]]
    ignored: List[str]


def is_data_file_name(file_name: str) -> bool:
    """``.csv``/``.txt``/``.<split name>``, optionally compressed (see the module docstring)."""
    name = file_name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    suffix = Path(name).suffix
    return suffix in DATA_SUFFIXES or suffix[1:] in _SPLIT_ALIASES


def normalize_split(name: str) -> str:
    split = _SPLIT_ALIASES.get(name.lower())
    if split is None:
        raise ValueError(f"unknown split {name!r}: use train, valid or test")
    return split


def split_of_name(file_name: str) -> Optional[str]:
    """The split a file name says: contains ``train``, ``test``, or a word ``val``/``valid``/
    ``validation``/``dev``; None when it says none; an error when it says several."""
    name = file_name.lower()
    found = {
        s
        for s, hit in (
            ("train", "train" in name),
            ("test", "test" in name),
            ("valid", _VALID_WORD.search(name) is not None),
        )
        if hit
    }
    if len(found) > 1:
        raise ValueError(
            f"{file_name}: the name matches several splits ({', '.join(sorted(found))}); "
            f"pass the file alone with --split"
        )
    return found.pop() if found else None


def discover_sources(fmt: str, input_path: str, split: Optional[str]) -> Sources:
    """Input files per split (in SPLIT_ORDER), for format ``fmt``."""
    root = Path(input_path)
    wanted = normalize_split(split) if split else None
    if not root.exists():
        raise FileNotFoundError(f"--input {input_path}: no such file or directory")
    ignored: List[str] = []
    if root.is_file():
        found = _single_file(fmt, root, wanted)
    elif fmt == "aliccp-raw":
        found = _raw_directory(root, wanted, ignored)
    else:
        found = _directory(root, wanted, ignored)
    if not found:
        passed = f"; ignored {', '.join(ignored)}" if ignored else ""
        raise FileNotFoundError(
            f"--input {input_path}: no input files found for format {fmt} "
            f"({_expected(fmt)}){passed}"
        )
    return Sources({s: found[s] for s in SPLIT_ORDER if s in found}, ignored)


def _expected(fmt: str) -> str:
    if fmt == "aliccp-raw":
        return "expected sample_skeleton_{train,test}.csv and common_features_{train,test}.csv"
    return "expected file names containing train / test / valid, or one file with --split"


def _single_file(fmt: str, path: Path, wanted: Optional[str]) -> Dict[str, List[SourceFile]]:
    split = wanted or split_of_name(path.name)
    if split is None:
        raise ValueError(
            f"--input {path}: cannot tell the split from the file name; pass --split NAME"
        )
    common = None
    if fmt == "aliccp-raw":
        if "sample_skeleton" not in path.name:
            raise ValueError(
                f"--input {path}: a raw Ali-CCP input file must be a sample_skeleton_*.csv file"
            )
        common_path = path.with_name(path.name.replace("sample_skeleton", "common_features"))
        if not common_path.is_file():
            raise FileNotFoundError(
                f"{path}: its common features file {common_path} does not exist"
            )
        common = str(common_path)
    return {split: [SourceFile(str(path), split, common)]}


def _raw_directory(
    root: Path, wanted: Optional[str], ignored: List[str]
) -> Dict[str, List[SourceFile]]:
    found: Dict[str, List[SourceFile]] = {}
    for split in _RAW_SPLITS:
        if wanted and split != wanted:
            continue
        names = {f"sample_skeleton_{split}.csv" + z for z in ("",) + COMPRESSION_SUFFIXES}
        for folder in (root, root / split):
            candidates = sorted(folder.glob(f"sample_skeleton_{split}*")) if folder.is_dir() else []
            skeletons = [p for p in candidates if p.name in names]
            ignored.extend(str(p) for p in candidates if p.name not in names)
            if not skeletons:
                continue
            if len(skeletons) > 1:
                raise ValueError(
                    f"{folder}: several skeleton files for split {split}: "
                    f"{', '.join(p.name for p in skeletons)}"
                )
            skeleton = skeletons[0]
            common = skeleton.with_name(skeleton.name.replace("sample_skeleton", "common_features"))
            if not common.is_file():
                raise FileNotFoundError(
                    f"{skeleton}: its common features file {common} does not exist"
                )
            found[split] = [SourceFile(str(skeleton), split, str(common))]
            break
    return found


def _directory(
    root: Path, wanted: Optional[str], ignored: List[str]
) -> Dict[str, List[SourceFile]]:
    found: Dict[str, List[SourceFile]] = {}
    passed: List[str] = []
    for path in sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
    ):
        split = split_of_name(path.name)
        if split and (wanted is None or split == wanted):
            if is_data_file_name(path.name):
                found.setdefault(split, []).append(SourceFile(str(path), split))
            else:
                passed.append(str(path))
    if found:
        ignored.extend(passed)
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        split = _SPLIT_ALIASES.get(folder.name.lower())
        if split is None or (wanted and split != wanted):
            continue
        for path in sorted(
            p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
        ):
            if is_data_file_name(path.name):
                found.setdefault(split, []).append(SourceFile(str(path), split))
            else:
                passed.append(str(path))
    ignored.extend(passed)
    return found
