"""Reading checkpoint files without running code from them.

A checkpoint copied from elsewhere is untrusted input. Nothing in it is unpickled by a loader that
can call arbitrary globals:

* DCP's ``.metadata`` is a pickle (DCP's own format). :class:`CheckpointReader` reads it with
  :class:`MetadataUnpickler`, which resolves only the DCP metadata classes, ``torch.Size``,
  dtypes, layouts and paths; any other global is refused before anything is called.
* Tensor data (``*.distcp``) is read by DCP with ``torch.load(weights_only=True)``; non-tensor
  entries (optimiser hyper-parameters) go through :class:`WeightsOnlyLoadPlanner`, which loads
  them with ``weights_only=True`` too (DCP's default planner does not).
* Per-rank run state is JSON (:func:`dumps_state` / :func:`loads_state`): tensors, arrays and
  tuples are tagged objects decoded by constructing them from their bytes, never by import.
* ``meta.json`` lists every file of the checkpoint with its size and, for the small ones,
  SHA-256 (:func:`file_manifest`); :func:`verify_files` checks them before DCP opens anything,
  so a truncated or altered file is named, and the checkpoint can be skipped for an older one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

METADATA_FILE = ".metadata"
# Files small enough to hash at every save and load (the DCP metadata, the per-rank state).
_DIGESTED_SUFFIXES = (METADATA_FILE, ".json")

_ALLOWED_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated, altered or not in the expected format."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, resolving only the allow-listed classes (no other code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """The DCP metadata at ``path`` (a ``.metadata`` file), read with :class:`MetadataUnpickler`.

    Raises:
        CorruptCheckpointError: naming ``path``.
    """
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CorruptCheckpointError(
            f"{path}: unreadable checkpoint metadata ({_reason(e)})"
        ) from e
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"{path}: unreadable checkpoint metadata (a {type(metadata).__name__}, not DCP's)"
        )
    return metadata


class CheckpointReader(FileSystemReader):
    """DCP's file-system reader with the metadata read by :func:`read_metadata_file`, and data
    read file by file so that a failure names its file."""

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: Dict[str, List[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in by_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt file
                raise CorruptCheckpointError(
                    f"{Path(self.path) / name}: unreadable tensor data ({_reason(e)})"
                ) from e
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries loaded by ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


# -- per-rank state as JSON ---------------------------------------------------------------------


def _encode(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        return {
            "$tensor": str(data.dtype).removeprefix("torch."),
            "shape": list(data.shape),
            "bytes": base64.b64encode(data.reshape(-1).view(torch.uint8).numpy().tobytes()).decode()
            if data.numel()
            else "",
        }
    if isinstance(obj, np.ndarray):
        return {
            "$ndarray": obj.dtype.str,
            "shape": list(obj.shape),
            "bytes": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode(),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state: dict keys must be strings, got {list(obj)[:4]}")
        return {k: _encode(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state: cannot store a {type(obj).__name__} as JSON")


def _decode(obj: Dict[str, Any]) -> Any:
    if "$tuple" in obj:
        return tuple(obj["$tuple"])
    if "$tensor" in obj:
        dtype = getattr(torch, str(obj["$tensor"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {obj['$tensor']!r}")
        raw = bytearray(base64.b64decode(obj["bytes"]))
        empty = torch.empty(0, dtype=torch.uint8)
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else empty
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if "$ndarray" in obj:
        dtype = np.dtype(str(obj["$ndarray"]))
        if dtype.hasobject:
            raise ValueError(f"array dtype {dtype} holds Python objects")
        data = base64.b64decode(obj["bytes"])
        return np.frombuffer(data, dtype=dtype).reshape(obj["shape"]).copy()
    return obj


def dumps_state(state: Mapping[str, Any]) -> bytes:
    """``state`` (JSON types, tuples, tensors, NumPy arrays) as JSON bytes; exact round trip."""
    return json.dumps(_encode(dict(state))).encode()


def loads_state(data: bytes, path: str | os.PathLike) -> Dict[str, Any]:
    """Inverse of :func:`dumps_state`.

    Raises:
        CorruptCheckpointError: naming ``path``.
    """
    try:
        state = json.loads(data, object_hook=_decode)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable run state ({_reason(e)})") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: unreadable run state (not a JSON object)")
    return state


# -- file manifest ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(directory: Path, skip: str) -> Dict[str, Dict[str, Any]]:
    """``{name: {"bytes": n[, "sha256": hex]}}`` of the files in ``directory`` but ``skip``."""
    manifest: Dict[str, Dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        if path.name == skip or not path.is_file():
            continue
        entry: Dict[str, Any] = {"bytes": path.stat().st_size}
        if path.name.endswith(_DIGESTED_SUFFIXES):
            entry["sha256"] = _sha256(path)
        manifest[path.name] = entry
    return manifest


def verify_files(directory: Path, manifest: Mapping[str, Mapping[str, Any]]) -> None:
    """Checks that every file of ``manifest`` is in ``directory`` with its size and digest.

    Raises:
        CorruptCheckpointError: naming the first file that is missing, truncated or altered.
    """
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing checkpoint file")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CorruptCheckpointError(
                f"{path}: {size} bytes, {entry.get('bytes')} when it was written (truncated or"
                " altered)"
            )
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"{path}: content differs from when it was written")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}"


def failure_reason(e: BaseException) -> str:
    """One line for a DCP failure: the first failed rank's exception, not DCP's tracebacks."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (cause, _) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return f"rank {rank}: {type(cause).__name__}: {first_line[:200]}"
    return _reason(e)
