"""Export of a trained model as one TorchScript file for single-process serving.

The exported module takes flat tensors instead of a ``KeyedJaggedTensor``, keys in a fixed order
(the training schema's fields, listed in the sidecar JSON)::

    import fbgemm_gpu  # registers the FBGEMM operators the module calls (torchrec imports it too)
    module = torch.jit.load("model.pt")
    probs = module(values, lengths)            # or (values, lengths, weights) for weighted models
    # values  int64 [sum of lengths]: the ids of field 0 for rows 0..B-1, then field 1, ...
    # lengths int32 [F * B]: ids per (field, row), field-major (KeyedJaggedTensor layout)
    # weights float32 [sum of lengths]: per-id weights, aligned with values
    # probs   float32 [B, T]: sigmoid of the task logits, tasks in training order (B >= 1)

How: the eval-mode model (embedding tables optionally replaced by TorchRec's quantised
``EmbeddingBagCollection`` / ``EmbeddingCollection`` with int8 rows, FBGEMM's CPU kernels) is traced
with ``torchrec.fx.symbolic_trace`` (which keeps KJT handling symbolic, unlike ``torch.jit.trace``
that would bake one batch's lengths in), tensor literals built from Python lists in the traced
graph (``torch.tensor([(0, 1), ...])``, which TorchScript cannot type) are folded into buffers,
and the graph is compiled with ``torch.jit.script``.

Before the file is published the saved file is loaded back and compared with the trained model
on the given rows; an export whose probabilities differ by more than the tolerance is refused.
Its file size, the measured difference and the latency per batch go to ``<path>.json``.
"""

# No ``from __future__ import annotations`` here: fx copies the wrappers' annotations into the
# generated code, and TorchScript cannot resolve them as strings.
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torchrec.fx
from torch import nn
from torch.fx import GraphModule
from torch.fx.node import Node, map_aggregate
from torchrec.inference.modules import quantize_embeddings
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.models.model import MultiTaskModel

EXPORT_FORMAT = "torchscript"
QUANTIZATIONS = ("none", "int8")
# Largest accepted |p_export - p_trained| per quantisation. fp32 is the same arithmetic; int8
# rows (per-row scale and bias, FBGEMM) perturb each embedding by about range/255, measured at
# a few 1e-4 on the probabilities of trained demo models.
TOLERANCES: Dict[str, float] = {"none": 1e-6, "int8": 1e-2}
_LATENCY_WARMUP = 3


class _FlatInputs(nn.Module):
    """``forward(values, lengths) -> probabilities [B, T]`` around a KJT model."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model = model
        self.keys: List[str] = list(keys)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths)
        return torch.sigmoid(self.model(features))


class _WeightedFlatInputs(nn.Module):
    """``forward(values, lengths, weights) -> probabilities [B, T]`` around a weighted KJT model."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model = model
        self.keys: List[str] = list(keys)

    def forward(
        self, values: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        features = KeyedJaggedTensor(
            keys=self.keys, values=values, lengths=lengths, weights=weights
        )
        return torch.sigmoid(self.model(features))


def flat_inputs(features: KeyedJaggedTensor, keys: List[str], weighted: bool) -> List[torch.Tensor]:
    """The exported module's arguments for ``features``: ``[values, lengths(, weights)]``, the
    keys permuted into ``keys`` order (extra keys dropped)."""
    present = features.keys()
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"features lack the exported key(s) {missing}")
    ordered = features.permute([present.index(k) for k in keys])
    args = [ordered.values().long(), ordered.lengths().int()]
    if weighted:
        args.append(ordered.weights().float())
    return args


def quantize_tables(model: MultiTaskModel) -> MultiTaskModel:
    """Replaces, in place, every embedding table (field bags, MemoNet codebooks) of ``model`` by
    int8 rows (TorchRec's quantised modules: per-row scale and bias, FBGEMM kernels); dense layers
    stay fp32. Returns ``model``."""
    return quantize_embeddings(
        model,
        dtype=torch.qint8,
        inplace=True,
        additional_qconfig_spec_keys=[EmbeddingCollection],
        additional_mapping={EmbeddingCollection: QuantEmbeddingCollection},
    )


def _contains_node(arg: Any) -> bool:
    found: List[Node] = []
    map_aggregate(arg, lambda a: found.append(a) if isinstance(a, Node) else None)
    return bool(found)


def fold_tensor_literals(graph_module: GraphModule) -> int:
    """Replaces every ``torch.tensor(<python constant>, ...)`` call of the graph by a buffer.

    TorchScript types ``torch.tensor``'s data argument as a flat list of numbers, so a traced
    literal such as MemoNet's field-pair table ``torch.tensor([(0, 1), (0, 2), ...])`` does not
    compile; as a buffer (moved to the call's device) it does, with the same values.

    Returns:
        The number of folded calls.
    """
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not torch.tensor:
            continue
        if _contains_node(node.args):
            continue
        kwargs = dict(node.kwargs)
        device = kwargs.pop("device", None)
        if _contains_node(kwargs):
            continue
        name = f"_folded_tensor_{folded}"
        graph_module.register_buffer(name, torch.tensor(*node.args, **kwargs))
        with graph_module.graph.inserting_before(node):
            replacement = graph_module.graph.get_attr(name)
            if device is not None:
                replacement = graph_module.graph.call_method("to", (replacement, device))
        node.replace_all_uses_with(replacement)
        graph_module.graph.erase_node(node)
        folded += 1
    graph_module.recompile()
    return folded


def script_model(model: MultiTaskModel, keys: List[str], weighted: bool) -> torch.jit.ScriptModule:
    """The TorchScript module with the flat signature (see the module docstring)."""
    wrapper = _WeightedFlatInputs(model, keys) if weighted else _FlatInputs(model, keys)
    graph_module = torchrec.fx.symbolic_trace(wrapper.eval())
    fold_tensor_literals(graph_module)
    return torch.jit.script(graph_module)


def _latency_ms(
    module: torch.jit.ScriptModule, args: List[torch.Tensor], repeats: int
) -> Dict[str, float]:
    with torch.no_grad():
        for _ in range(_LATENCY_WARMUP):
            module(*args)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(*args)
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p90 = times[int(0.9 * (len(times) - 1))]
    return {"median": statistics.median(times), "p90": p90, "min": times[0]}


def export_model(
    model: MultiTaskModel,
    keys: List[str],
    path: str | os.PathLike,
    sample: KeyedJaggedTensor,
    *,
    quantization: str = "none",
    weighted: bool = False,
    latency_repeats: int = 20,
    provenance: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Writes the TorchScript export of ``model`` to ``path`` and its report to ``<path>.json``.

    Args:
        model: the trained model (eval mode, CPU).
        keys: the model's fields, the order of the flat inputs.
        path: the ``.pt`` file to write (atomically, with the JSON).
        sample: rows to check the export on and to time it with (one batch).
        quantization: ``none`` (fp32 tables) or ``int8``.
        weighted: the model reads per-id weights (a third input).
        latency_repeats: timed calls after warm-up.
        provenance: extra entries for the report (checkpoint, step, ...).

    Returns:
        The report: file size, latency per batch (ms), largest probability difference.

    Raises:
        ValueError: unknown quantisation, or the export differs from the model beyond tolerance
            (nothing is written then).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    path = Path(path)
    model = model.eval()
    args = flat_inputs(sample, keys, weighted)
    with torch.no_grad():
        expected = torch.sigmoid(model(sample))
    # A frozen copy: the export carries no autograd state and the caller's model is untouched.
    source = copy.deepcopy(model).requires_grad_(False)
    if quantization == "int8":
        quantize_tables(source)
    scripted = script_model(source, keys, weighted)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.jit.save(scripted, os.fspath(tmp))
        loaded = torch.jit.load(os.fspath(tmp))
        with torch.no_grad():
            max_diff = float((loaded(*args) - expected).abs().max())
        tolerance = TOLERANCES[quantization]
        if not max_diff <= tolerance:
            raise ValueError(
                f"export check failed: the {quantization} export differs from the trained model "
                f"by {max_diff:.3g} in probability (tolerance {tolerance:g})"
            )
        report: Dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "load": "import fbgemm_gpu; torch.jit.load(file)",
            "file": path.name,
            "file_bytes": tmp.stat().st_size,
            "quantization": quantization,
            "inputs": {
                "keys": list(keys),
                "signature": "(values, lengths, weights)" if weighted else "(values, lengths)",
                "values": "int64 [sum(lengths)], field-major",
                "lengths": f"int32 [{len(keys)} * B], field-major",
                **({"weights": "float32 [sum(lengths)], aligned with values"} if weighted else {}),
            },
            "outputs": {"tasks": list(model.tasks), "kind": "probability", "shape": "[B, T]"},
            "check": {"rows": sample.stride(), "max_abs_diff": max_diff, "tolerance": tolerance},
            "latency_ms_per_batch": {
                "batch_size": sample.stride(),
                "threads": torch.get_num_threads(),
                **_latency_ms(loaded, args, latency_repeats),
            },
            **(provenance or {}),
        }
        report_tmp = tmp.with_name(tmp.name + ".json")
        report_tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
        os.replace(report_tmp, report_path(path))
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".json")):
            leftover.unlink(missing_ok=True)
    return report


def report_path(path: str | os.PathLike) -> Path:
    """The JSON report written next to an export."""
    return Path(f"{os.fspath(path)}.json")


def _is_export(path: Path) -> bool:
    """Whether ``path`` and its report are an earlier export (the report names the file)."""
    try:
        report = json.loads(report_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(report, dict)
        and report.get("format") == EXPORT_FORMAT
        and report.get("file") == path.name
    )


def check_export_path(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuses an export path that would replace anything but an earlier export, or an earlier
    export without ``overwrite``; writes nothing.

    Raises:
        FileExistsError: naming the path.
    """
    path = Path(path)
    if path.is_dir() or path.is_symlink():
        raise FileExistsError(f"--export {path} is a directory or a link; give a file path")
    taken = [p for p in (path, report_path(path)) if p.exists() or p.is_symlink()]
    if not taken:
        return
    if not _is_export(path):
        raise FileExistsError(
            f"--export {taken[0]} exists and is not an earlier export (no matching "
            f"{report_path(path).name}); choose another path"
        )
    if not overwrite:
        raise FileExistsError(f"--export {path} holds an earlier export; pass --overwrite")
