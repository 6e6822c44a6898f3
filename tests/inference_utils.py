"""Shared pieces of the inference tests (test_predict, test_export, test_analyze): a tiny
synthetic dataset, a tiny DTN config, checkpoints written in-process, a one-rank process group."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import yaml
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.prepare import PrepareOptions, prepare_dataset
from dtn_torchrec.data.schema import FieldSpec, SchemaSpec
from dtn_torchrec.data.synth import SynthConfig, generate
from dtn_torchrec.distributed.checkpoint import CheckpointManager
from dtn_torchrec.models.model import MultiTaskModel
from dtn_torchrec.serving.loading import InferenceModel

# DTN (reference variant) with all three interaction methods, at toy width; MemoNet crosses four
# fields so that hashing, codebooks and the traced pair table are all exercised.
TINY_DTN: Dict[str, Any] = {
    "name": "dtn",
    "tasks": ["click", "conversion"],
    "embedding": {"embedding_dim": 4, "pooling": "mean"},
    "tower": {"hidden_dims": [8]},
    "dtn": {
        "methods": [
            {
                "kind": "masknet",
                "output_dim": 8,
                "num_mask_blocks": 1,
                "mask_hidden_dim": 8,
                "mask_block_dim": 8,
                "mlp_dims": [8],
            },
            {
                "kind": "memonet",
                "output_dim": 8,
                "num_buckets": 64,
                "num_hash": 2,
                "fields": ["121", "125", "206", "216"],
            },
            {"kind": "gdcn", "output_dim": 8, "num_cross_layers": 1},
        ]
    },
}


def run_config(
    data: Path, out: Path, model: Optional[Dict[str, Any]] = None, **data_keys: Any
) -> Dict[str, Any]:
    """A complete run config (the shape of ``configs/*.yaml``) as a dict."""
    return {
        "seed": 1,
        "data": {
            "path": str(data),
            "batch_size": 64,
            "eval_batch_size": 128,
            "shuffle_buffer_rows": 256,
            **data_keys,
        },
        "model": copy.deepcopy(model or TINY_DTN),
        "train": {
            "epochs": 1,
            "log_every_steps": 2,
            "dense_optimizer": {"name": "adam", "lr": 3.0e-3},
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
        },
        "output": {"dir": str(out), "tensorboard": False},
    }


def write_config(path: Path, config: Dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_dataset(
    root: Path, *, train_rows: int = 900, test_rows: int = 300, seed: int = 20240, **prepare: Any
) -> Path:
    """``dtn-synth`` raw files under ``root/raw`` prepared into ``root/data`` (returned)."""
    generate(
        SynthConfig(
            train_rows=train_rows,
            test_rows=test_rows,
            seed=seed,
            id_scale=0.001,
            history_scale=0.05,
            rows_per_user=5,
            ctr=0.3,
            cvr=0.5,
        ),
        root / "raw",
    )
    prepare_dataset(
        "aliccp-raw", root / "raw", root / "data", PrepareOptions(progress=False, **prepare)
    )
    return root / "data"


def toy_schema() -> SchemaSpec:
    """Ali-CCP-like fields (MemoNet's crossed fields among them) for models built without data."""
    fields = [
        FieldSpec("101", 40, max_length=1),
        FieldSpec("109_14", 30, max_length=6),
        FieldSpec("121", 20, max_length=1),
        FieldSpec("125", 8, max_length=1),
        FieldSpec("206", 50, max_length=1),
        FieldSpec("216", 25, max_length=1),
    ]
    return SchemaSpec(fields=fields, labels=["click", "conversion"])


def random_features(
    schema: SchemaSpec, batch_size: int, seed: int, weighted: bool = False
) -> KeyedJaggedTensor:
    """A KJT of random ids (empty lists included), keys in schema order."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in schema.fields:
        n = torch.randint(0, max(f.max_length, 1) + 1, (batch_size,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=g))
    total = int(sum(int(n.sum()) for n in lengths))
    return KeyedJaggedTensor(
        keys=schema.field_names,
        values=torch.cat(values),
        lengths=torch.cat(lengths).int(),
        weights=torch.rand(total, generator=g) if weighted else None,
    )


def save_checkpoint(model: MultiTaskModel, directory: Path, step: int = 1) -> Path:
    """Writes ``model`` as ``dtn-train`` would (``CheckpointManager``, model under ``model.``);
    needs the one-rank process group."""
    wrapper = InferenceModel(model)
    optimizer = KeyedOptimizerWrapper(
        dict(wrapper.named_parameters()), lambda params: torch.optim.SGD(params, lr=0.1)
    )
    return CheckpointManager(directory).save(step, model=wrapper, optimizer=optimizer)


def train_steps(model: MultiTaskModel, batches: Iterator, lr: float) -> None:
    """Plain Adam on every parameter (unsharded tables get dense gradients), one step per batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for batch in batches:
        loss = loss_fn(model(batch.sparse_features), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
