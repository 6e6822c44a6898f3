"""Sharded, atomic, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``<directory>``::

    step_<n>/                 one complete checkpoint (only ever created by a rename)
        .metadata             DCP metadata (global tensor layout)
        __<rank>_0.distcp     DCP data written by each rank (its shards, replicated tensors once)
        extra_rank<r>.json    rank r's non-tensor state (``extra``) and LR-scheduler state
        meta.json             {"step", "world_size", "format", "files"}, written last, by rank 0
    step_<n>.tmp/             a save in progress, or one a crash interrupted: never loaded
    latest                    the step of the newest complete checkpoint, written after the rename

Saving: every rank writes into ``step_<n>.tmp``; after all ranks report success rank 0 writes
``meta.json``, renames the directory to ``step_<n>``, rewrites ``latest`` (temp + rename) and
prunes old checkpoints down to ``keep_last``. A failure on any rank raises on every rank and
leaves the previous checkpoints and ``latest`` untouched; a killed job leaves at most a ``.tmp``
directory, which the next save removes.

What is saved: the model's ``state_dict()`` (sharded tables as ``ShardedTensor``: each rank
writes only its shards) and the optimiser's (fused sparse states such as Adagrad accumulators,
dense Adam moments and step). Optimiser entries with no state (fused SGD) are left out: DCP cannot
load an empty entry. DCP reshards on load, so a checkpoint written by N ranks under one plan loads
on M ranks under another; ``checkpoint_optim`` converts row-wise accumulators between column
sharded and unsharded layouts, and a table moved between a fused optimiser and data-parallel gets
its weights back and fresh optimiser state, with a warning naming it.

Per-rank state (``extra``: reader position, RNG states, ...) cannot be resharded. Loading at the
world size it was written with, each rank gets back its own ``extra``. Loading at another world
size, every rank gets rank 0's ``extra`` *without* the keys named in ``rank_local_keys`` (a
reader position in a rank-sharded stream or a per-rank RNG state means nothing to a different
rank layout); the trainer re-derives those (e.g. restarts the epoch, seeds from seed + rank).
The LR-scheduler state is global and always restored.

Loading runs no code from the checkpoint (see ``checkpoint_files``): ``meta.json`` lists every
file with its size (and SHA-256 for the small ones), checked before DCP opens anything; the DCP
metadata pickle is read by an allow-listed unpickler; the rest is tensors (``weights_only``) and
JSON. A checkpoint that fails the check is skipped by :meth:`CheckpointManager.latest_step` for
the newest intact one, with a warning naming the damaged file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.optim.lr_scheduler import LRScheduler
from torchrec.optim.keyed import KeyedOptimizer

from dtn_torchrec.distributed.checkpoint_files import (
    METADATA_FILE,
    CheckpointReader,
    CorruptCheckpointError,
    WeightsOnlyLoadPlanner,
    dumps_state,
    failure_reason,
    file_manifest,
    loads_state,
    read_metadata_file,
    verify_files,
)
from dtn_torchrec.distributed.checkpoint_optim import loadable_optimizer_state, saved_name

logger: logging.Logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
LATEST_FILE = "latest"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _extra_file(rank: int) -> str:
    return f"extra_rank{rank}.json"


def _read_payload(path: Path) -> Dict[str, Any]:
    """A rank's ``{"extra", "scheduler"}`` file.

    Raises:
        CorruptCheckpointError: naming ``path``.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: unreadable ({e.strerror or e})") from e
    payload = loads_state(data, path)
    if not isinstance(payload.get("extra"), dict) or "scheduler" not in payload:
        raise CorruptCheckpointError(f"{path}: no run state (extra, scheduler)")
    return payload


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _with_nonempty_state(optimizer_state: Dict[str, Any]) -> Dict[str, Any]:
    """The optimiser state dict without parameters that have no state (DCP cannot load those).

    The per-parameter dicts are shared with ``optimizer_state``, so DCP loading into the result
    fills ``optimizer_state`` in place.
    """
    state = {key: value for key, value in optimizer_state["state"].items() if value}
    return {**optimizer_state, "state": state}


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and, if present, CUDA) RNG states of this process."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and restores training state under one directory (see the module docstring).

    All ranks must call ``save`` / ``load`` together (they are collective); ``latest_step`` is
    local (reads the shared file system).

    Args:
        directory: checkpoint root, on a file system every rank sees.
        keep_last: complete checkpoints kept after each save (older ones are deleted).
        rank_local_keys: keys of ``extra`` that are dropped when loading at a different world
            size (reader positions, RNG states).
        pg: process group; None = the default group.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep_last: int = 2,
        rank_local_keys: Sequence[str] = (),
        pg: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank_local_keys = tuple(rank_local_keys)
        self._pg = pg
        self._reported_damaged: set[int] = set()  # warned about once per manager

    # -- queries -------------------------------------------------------------------------------

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step}"

    def complete_steps(self) -> List[int]:
        """Steps of the complete checkpoints, ascending."""
        if not self.directory.is_dir():
            return []
        steps = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / META_FILE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> Optional[int]:
        """Step named by ``latest`` if that checkpoint is complete, else the newest complete one
        (a crash between the rename and the marker update), else None; a damaged one (see
        :meth:`verify`) is skipped for the next older intact one, with a warning naming it.

        Raises:
            CorruptCheckpointError: complete checkpoints exist, none of them intact (names the
                damaged file of the newest).
        """
        candidates = self.complete_steps()[::-1]
        marker = self.directory / LATEST_FILE
        if marker.is_file():
            text = marker.read_text().strip()
            if text.isdigit() and int(text) in candidates:
                candidates.remove(int(text))
                candidates.insert(0, int(text))
        damaged: Dict[int, CorruptCheckpointError] = {}
        for step in candidates:
            try:
                self.verify(step)
            except CorruptCheckpointError as e:
                damaged[step] = e
                continue
            for bad, error in damaged.items():
                if bad not in self._reported_damaged:
                    self._reported_damaged.add(bad)
                    logger.warning("skipping a damaged checkpoint, using step %d: %s", step, error)
            return step
        if damaged:
            newest = next(iter(damaged.values()))
            raise CorruptCheckpointError(f"no intact checkpoint in {self.directory}: {newest}")
        return None

    def verify(self, step: int) -> Dict[str, Any]:
        """Checks checkpoint ``step``'s files against its ``meta.json`` and decodes its metadata
        and run state (safely: see ``checkpoint_files``); returns the meta. Tensor data is only
        checked for its size here.

        Raises:
            FileNotFoundError: not a complete checkpoint.
            CorruptCheckpointError: naming the missing, truncated, altered or unreadable file.
        """
        path = self.step_path(step)
        meta = self._read_meta(path)
        verify_files(path, meta["files"])
        read_metadata_file(path / METADATA_FILE)
        for rank in range(meta["world_size"]):
            _read_payload(path / _extra_file(rank))
        return meta

    def saved_world_size(self, step: int) -> int:
        """World size that wrote checkpoint ``step``."""
        return int(self._read_meta(self.step_path(step))["world_size"])

    # -- save ----------------------------------------------------------------------------------

    def _rank_and_size(self) -> tuple[int, int]:
        return dist.get_rank(self._pg), dist.get_world_size(self._pg)

    def _all_ok(self, ok: bool) -> bool:
        flags: List[Optional[bool]] = [None] * dist.get_world_size(self._pg)
        dist.all_gather_object(flags, ok, group=self._pg)
        return all(bool(flag) for flag in flags)

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: KeyedOptimizer,
        extra: Optional[Mapping[str, Any]] = None,
        scheduler: Optional[LRScheduler] = None,
        protected_steps: Collection[int] = (),
    ) -> Path:
        """Writes checkpoint ``step`` atomically (collective).

        Args:
            step: training step; names the directory.
            model: the DMP-wrapped model.
            optimizer: the combined optimiser (``optimizers.build_dense_optimizer``).
            extra: this rank's picklable non-tensor state (reader position, RNG states, epoch,
                metrics so far).
            scheduler: the dense LR scheduler.
            protected_steps: checkpoints that pruning keeps beyond ``keep_last`` (the run's
                best so far).

        Returns:
            The path of the complete checkpoint.

        Raises:
            RuntimeError: when any rank failed; previous checkpoints are untouched.
        """
        rank, world_size = self._rank_and_size()
        final, tmp = self.step_path(step), self.directory / f"step_{step}.tmp"
        error: Optional[BaseException] = None
        if rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for stale in self.directory.glob("step_*.tmp"):  # debris of killed saves
                    shutil.rmtree(stale)
                tmp.mkdir()
            except OSError as exc:
                error = exc
        if not self._all_ok(error is None):
            raise RuntimeError(f"checkpoint step {step}: rank 0 could not create {tmp}") from error
        try:
            state = {
                "model": model.state_dict(),
                "optim": _with_nonempty_state(optimizer.state_dict()),
            }
            dcp.save(state, checkpoint_id=tmp, process_group=self._pg)
            payload = {
                "extra": dict(extra or {}),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
            }
            _write_file_atomic(tmp / _extra_file(rank), dumps_state(payload))
        # DCP reports a failure on any rank as CheckpointException, a BaseException.
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - re-raised below
            error = exc
        if not self._all_ok(error is None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier(group=self._pg)  # nobody returns while the debris is still there
            raise RuntimeError(
                f"checkpoint step {step} failed on at least one rank; {self.directory} keeps its"
                f" previous checkpoints (latest: {self.latest_step()})"
            ) from error
        if rank == 0:
            try:
                self._commit(step, world_size, tmp, final, protected_steps)
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
        if not self._all_ok(error is None):
            raise RuntimeError(
                f"checkpoint step {step}: rank 0 could not commit {final}"
            ) from error
        return final

    def _commit(
        self, step: int, world_size: int, tmp: Path, final: Path, protected: Collection[int]
    ) -> None:
        meta = {
            "step": step,
            "world_size": world_size,
            "format": FORMAT_VERSION,
            "files": file_manifest(tmp, skip=META_FILE),
        }
        _write_file_atomic(tmp / META_FILE, json.dumps(meta).encode())
        if final.exists():
            # Saving a step again (e.g. after resuming at it): the new one replaces it.
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        _write_file_atomic(self.directory / LATEST_FILE, f"{step}\n".encode())
        for old in self.complete_steps()[: -self.keep_last]:
            if old != step and old not in protected:
                shutil.rmtree(self.step_path(old))
        logger.info("checkpoint step %d written to %s", step, final)

    # -- load ----------------------------------------------------------------------------------

    @staticmethod
    def _read_meta(path: Path) -> Dict[str, Any]:
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{meta_path}: unreadable ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise CorruptCheckpointError(
                f"{meta_path}: checkpoint format {found!r}, expected {FORMAT_VERSION}"
                + (" (format 1 kept pickled run state, never loaded)" if found == 1 else "")
            )
        if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("world_size"), int):
            raise CorruptCheckpointError(f"{meta_path}: no file list or world size")
        return meta

    def load(
        self,
        model: nn.Module,
        optimizer: Optional[KeyedOptimizer],
        step: Optional[int] = None,
        scheduler: Optional[LRScheduler] = None,
    ) -> Dict[str, Any]:
        """Restores model (and optimiser, scheduler) state in place (collective).

        Args:
            model: the DMP-wrapped model; any plan and world size.
            optimizer: the combined optimiser, or None to load the model only (inference).
            step: which checkpoint; None = ``latest_step()``.
            scheduler: the dense LR scheduler; its learning rates are applied to the optimiser.

        Returns:
            This rank's ``extra`` (see the module docstring for a changed world size).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        path = self.step_path(step)
        meta = self.verify(step)
        rank, world_size = self._rank_and_size()

        saved = read_metadata_file(path / METADATA_FILE).state_dict_metadata
        # Under the names the checkpoint uses (a renamed key keeps loading).
        model_state = model.state_dict()
        names = {key: saved_name(key, saved, "model.") for key in model_state}
        state: Dict[str, Any] = {"model": {names[k]: v for k, v in model_state.items()}}
        optimizer_state: Optional[Dict[str, Any]] = None
        if optimizer is not None:
            optimizer_state = optimizer.state_dict()
            state["optim"] = loadable_optimizer_state(
                _with_nonempty_state(optimizer_state), saved, path
            )
        try:
            dcp.load(
                state,
                storage_reader=CheckpointReader(path),
                planner=WeightsOnlyLoadPlanner(),
                process_group=self._pg,
            )
        # DCP reports a failure on any rank as CheckpointException, a BaseException.
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the path
            raise CorruptCheckpointError(
                f"{path}: cannot load the checkpoint's tensors ({failure_reason(e)})"
            ) from e
        model.load_state_dict({key: state["model"][name] for key, name in names.items()})
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

        saved_world_size = int(meta["world_size"])
        same_layout = saved_world_size == world_size
        source_rank = rank if same_layout else 0
        payload = _read_payload(path / _extra_file(source_rank))
        extra: Dict[str, Any] = dict(payload["extra"])
        if not same_layout:
            dropped = [key for key in self.rank_local_keys if key in extra]
            for key in dropped:
                del extra[key]
            logger.warning(
                "checkpoint %s was written by %d ranks, loading on %d: rank-local state %s not"
                " restored",
                path,
                saved_world_size,
                world_size,
                dropped,
            )
        if scheduler is not None:
            if payload["scheduler"] is None:
                raise ValueError(f"{path}: no LR-scheduler state was saved")
            scheduler.load_state_dict(payload["scheduler"])
            # load_state_dict restores the scheduler's counters but not the optimiser's lr.
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        return extra
