"""Planning, sharding, optimisers and checkpoints for any model holding EmbeddingBagCollections /
EmbeddingCollections (TorchRec ``DistributedModelParallel``; gloo on CPU, nccl on CUDA).

Usage (one rank of a torchrun / TorchX job, or a plain single process)::

    from dtn_torchrec.distributed.checkpoint import CheckpointManager, capture_rng_state
    from dtn_torchrec.distributed.config import (DenseOptimizerConfig, ShardingConfig,
        SparseOptimizerConfig, TableShardingConfig)
    from dtn_torchrec.distributed.launch import init_distributed, shutdown_and_exit
    from dtn_torchrec.distributed.optimizers import apply_sparse_optimizer, build_dense_optimizer
    from dtn_torchrec.distributed.parallel import shard_model
    from dtn_torchrec.distributed.planning import format_plan, plan_model, plan_to_json
    from dtn_torchrec.distributed.topology import make_topology, topology_from_env

    rank, world_size, local_rank, device, backend = init_distributed()
    sharding = ShardingConfig(tables={
        "memonet_*": TableShardingConfig(["row_wise"]),
        "t_101": TableShardingConfig(["column_wise"], min_partition=8)})
    model = MultiTaskTrainWrapper(build_model(cfg, schema, torch.device("meta")))
    apply_sparse_optimizer(model, SparseOptimizerConfig("rowwise_adagrad", lr=0.01))  # before DMP
    plan = plan_model(model, sharding, topology=topology_from_env(device.type, sharding),
                      batch_size=per_rank_batch, pg=torch.distributed.group.WORLD)
    if rank == 0: print(format_plan(plan))
    dmp = shard_model(model, device=device, plan=plan)
    optimizer, scheduler, dense = build_dense_optimizer(dmp, DenseOptimizerConfig(
        name="adam", lr=1e-3, grad_clip_norm=1.0,
        warmup_steps=500, decay="cosine", decay_steps=10_000))

    ckpt = CheckpointManager(output_dir / "checkpoints", keep_last=2,
                             rank_local_keys=("reader", "rng"))
    extra = {}
    if ckpt.latest_step() is not None:          # resume; any world size / plan may have saved it
        extra = ckpt.load(dmp, optimizer, scheduler=scheduler)

    for step, batch in ...:                     # or TrainPipelineSparseDist(dmp, optimizer, device)
        loss, (_, logits, labels) = dmp(batch)
        loss.backward()                         # fused sparse update happens here
        optimizer.step()                        # dense part, clipped (dense.last_total_grad_norm)
        scheduler.step()                        # once per optimiser step
        optimizer.zero_grad()
        if step % every == 0:
            ckpt.save(step, model=dmp, optimizer=optimizer, scheduler=scheduler,
                      extra={"step": step, "epoch": epoch, "reader": reader.state(),
                             "rng": capture_rng_state()})
    shutdown_and_exit(0)                        # barrier, destroy_process_group, os._exit

``dtn-plan`` (no process group, no GPU needed)::

    topology = make_topology(world_size=64, local_world_size=8, compute_device="cuda",
                             cfg=ShardingConfig(hbm_cap_gb=80, ddr_cap_gb=512))
    plan = plan_model(meta_model, sharding, topology=topology, batch_size=4096)  # pg=None
    json.dump(plan_to_json(plan), f)      # per-rank storage table: torchrec logger at INFO

Facts this layer relies on (``shared/design/torchrec-practice.md``, re-checked by the tests):

* CPU: every sharding type is exact against an unsharded model (``tests/test_sharding.py``);
  ``row_wise`` / ``table_row_wise`` are offered on CPU by our sharders (TorchRec's planner only
  offers them on CUDA) but only when a table asks; EmbeddingCollection ``data_parallel`` crashes
  on CPU and is refused. Invalid requests fail on every rank naming the table.
* FBGEMM's CPU kernels run only fused ``sgd`` / ``adagrad`` / ``rowwise_adagrad`` and ignore
  weight decay; ``shard_model`` refuses ``adam`` / sparse weight decay on CPU.
* ``data_parallel`` tables are updated (and clipped) by the dense optimiser, not the fused one.
* Embedding gradients are averaged over ranks like DDP's dense ones (TorchRec's gradient division).
* Checkpoints reshard (2 ranks -> 1 and 1 -> 2 give identical logits and next steps); per-rank
  ``extra`` comes back to its own rank at the same world size, else rank 0's without
  ``rank_local_keys`` (see ``checkpoint.py``).
"""
