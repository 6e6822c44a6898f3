"""Inference on trained checkpoints: loading (sharded or whole), batch scoring, export for serving.

* ``loading``: find a checkpoint, check it against the config and dataset, restore it into a
  sharded (``DistributedModelParallel``, any world size) or an unsharded model.
* ``scoring``: score a Parquet split on 1..N ranks, write per-rank Parquet parts atomically.
* ``export``: a single-process TorchScript module with a flat-tensor signature, optionally with
  int8 embedding tables.
"""
