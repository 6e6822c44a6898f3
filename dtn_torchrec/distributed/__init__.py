"""Planning, sharding, optimisers and checkpoints for any model holding EmbeddingBagCollections /
EmbeddingCollections (TorchRec ``DistributedModelParallel``; gloo on CPU, nccl on CUDA).

Every command builds and shards a model through one path, ``build.py`` (model on ``meta`` ->
fused sparse optimiser -> plan -> ``DistributedModelParallel``); its docstring shows the calls.
``train.session`` and ``train.loop`` show them in use with checkpoints and the train pipeline;
``docs/sharding.md`` explains the sharding types, memory and checkpoints.

Facts this layer relies on (``docs/sharding.md``, re-checked by the tests):

* CPU: every sharding type is exact against an unsharded model (``tests/test_sharding.py``);
  ``row_wise`` / ``table_row_wise`` are offered on CPU by our sharders (TorchRec's planner only
  offers them on CUDA) but only when a table asks; EmbeddingCollection ``data_parallel`` crashes
  on CPU and is refused. Invalid requests fail on every rank naming the table.
* FBGEMM's CPU kernels run only fused ``sgd`` / ``adagrad`` / ``rowwise_adagrad`` and ignore
  weight decay; ``shard_model`` refuses ``adam`` / sparse weight decay on CPU.
* No table is ``data_parallel`` unless the configuration names it (``sharders.py``): the planner
  would flip tables between replicated and sharded as the world size changes. Where a table would
  get one column shard the column-splitting types are not offered either (``planning.py``): the
  planner rates them equal to ``table_wise`` and picks either, not reproducibly.
* ``data_parallel`` tables are updated (and clipped) by the dense optimiser, not the fused one.
* Embedding gradients are averaged over ranks like DDP's dense ones (TorchRec's gradient division).
* Checkpoints reshard (2 ranks -> 1 and 1 -> 2 give identical logits and next steps); per-rank
  ``extra`` comes back to its own rank at the same world size, else rank 0's without
  ``rank_local_keys`` (see ``checkpoint.py``).
"""
