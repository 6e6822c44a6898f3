"""Model size and cost: parameters (embedding vs dense) and dense FLOPs per sample.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the dense part (experts,
gates, towers, relation) of a CPU copy of the model run on a random batch; like every FLOP
counter it counts matrix products (``2 * m * n * k``), not elementwise ops or embedding lookups.
Training costs ``3x`` the forward (backward = 2 products per forward product). MemoNet is counted
as defined, per looked-up id: its distinct-id merge (``dedup_ids``) does fewer products, as many
as the batch has distinct ids, which is a property of the data, not of the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dtn_torchrec.data.schema import ALICCP_FIELDS, ALICCP_LABELS, FieldSpec, SchemaSpec
from dtn_torchrec.models.builder import build_model
from dtn_torchrec.models.config import ModelConfig
from dtn_torchrec.models.experts.memonet import drop_id_dedup

# Ali-CCP table rows (id 0 = missing/OOV, so vocab lines + 1), from the reference vocab files
# (docs/data-formats.md, the 23 Ali-CCP fields). 110_14 and 205 have no vocab file there: 110_14
# uses the user_shops cardinality of Merlin's schema, 205 the item-id vocabulary of AITM.
ALICCP_VOCAB_LINES: Dict[str, int] = {
    "101": 276022,
    "109_14": 12126,
    "110_14": 116741,
    "127_14": 387969,
    "150_14": 99203,
    "121": 97,
    "122": 13,
    "124": 2,
    "125": 7,
    "126": 3,
    "127": 3,
    "128": 2,
    "129": 4,
    "205": 467298,
    "206": 8292,
    "207": 516905,
    "210": 98758,
    "216": 181697,
    "508": 7403,
    "509": 319982,
    "702": 123442,
    "853": 84476,
    "301": 3,
}
# Longest id list seen per multi-valued field (docs/data-formats.md); every other field holds one.
ALICCP_MAX_LENGTHS: Dict[str, int] = {
    "109_14": 138,
    "110_14": 973,
    "127_14": 587,
    "150_14": 200,
    "210": 14,
    "853": 6,
}

# Tables are capped to this many rows in the CPU copy used for FLOP counting (FLOPs do not
# depend on table size; the copy must not allocate the real tables).
_FLOP_COPY_MAX_ROWS = 1000


def aliccp_reference_schema() -> SchemaSpec:
    """A schema with the Ali-CCP reference table sizes, for sizing models without a dataset."""
    fields = [
        FieldSpec(
            name=name,
            num_embeddings=ALICCP_VOCAB_LINES[name] + 1,
            cardinality=ALICCP_VOCAB_LINES[name],
            max_length=ALICCP_MAX_LENGTHS.get(name, 1),
        )
        for name in ALICCP_FIELDS
    ]
    return SchemaSpec(fields=fields, labels=list(ALICCP_LABELS), source_format="aliccp-reference")


@dataclass
class ModelStats:
    """Size and cost of one model.

    Args:
        embedding_params (int): rows x dims of every TorchRec table (fields and MemoNet codebooks).
        dense_params (int): every other parameter (experts, gates, towers, input norm).
        forward_flops_per_sample (float): dense forward FLOPs per sample.
    """

    embedding_params: int
    dense_params: int
    forward_flops_per_sample: float

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.dense_params

    @property
    def train_flops_per_sample(self) -> float:
        """Forward + backward: 3x the forward."""
        return 3.0 * self.forward_flops_per_sample

    def to_dict(self) -> Dict[str, float]:
        return {
            "embedding_params": self.embedding_params,
            "dense_params": self.dense_params,
            "total_params": self.total_params,
            "forward_flops_per_sample": self.forward_flops_per_sample,
            "train_flops_per_sample": self.train_flops_per_sample,
        }


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(embedding, dense)`` parameter counts; works on meta-device models.

    Embedding parameters are those of ``EmbeddingBagCollection`` / ``EmbeddingCollection`` modules.
    """
    embedding_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))
        for p in m.parameters()
    }
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embedding_ids)
    dense = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    return embedding, dense


def random_features(schema: SchemaSpec, batch_size: int, seed: int = 0) -> KeyedJaggedTensor:
    """A KJT with one key per schema field: one id per row (up to 4 for multi-valued fields)."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for f in schema.fields:
        n = torch.randint(1, min(f.max_length, 4) + 1, (batch_size,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, f.num_embeddings, (int(n.sum()),), generator=g))
    return KeyedJaggedTensor(
        keys=schema.field_names, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def dense_forward_flops(model: nn.Module, features: KeyedJaggedTensor) -> int:
    """FLOPs of ``model``'s dense part (everything after the sparse arch) on one batch."""
    with torch.no_grad():
        inputs = model.sparse_arch(features)
        with FlopCounterMode(display=False) as counter:
            logits = model.dense_arch(inputs)
            if model.relation is not None:
                model.relation(logits)
    return int(counter.get_total_flops())


def model_stats(cfg: ModelConfig, schema: SchemaSpec, batch_size: int = 8) -> ModelStats:
    """Parameter counts of ``cfg`` on ``schema`` (built on meta) and its dense FLOPs per sample
    (counted on a CPU copy with capped tables)."""
    embedding, dense = count_parameters(build_model(cfg, schema, device=torch.device("meta")))
    capped = dataclasses.replace(
        schema,
        fields=[
            dataclasses.replace(f, num_embeddings=min(f.num_embeddings, _FLOP_COPY_MAX_ROWS))
            for f in schema.fields
        ],
    )
    model = build_model(cfg, capped, device=torch.device("cpu")).eval()
    drop_id_dedup(model)
    flops = dense_forward_flops(model, random_features(capped, batch_size))
    return ModelStats(
        embedding_params=embedding, dense_params=dense, forward_flops_per_sample=flops / batch_size
    )
