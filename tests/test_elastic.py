"""Elastic training without a cluster: the per-rank micro-batch count that keeps the global
batch the same at any world size, and the ScalingConfig/FailureConfig a run asks Ray for."""

import pytest

from pipeline.config import load_config
from pipeline.train.loop import micro_batches
from pipeline.train.run import scaling_config


@pytest.mark.parametrize("accumulate,num_workers", [(1, 1), (1, 3), (2, 3), (3, 4), (1, 8)])
def test_the_global_micro_batch_count_is_the_same_at_every_world_size(accumulate, num_workers):
    for world in range(1, num_workers + 1):
        per_rank = [micro_batches(accumulate, num_workers, world, r) for r in range(world)]
        assert sum(per_rank) == accumulate * num_workers, (world, per_rank)
        assert max(per_rank) - min(per_rank) <= 1  # spread evenly: no rank waits long on another


def test_a_full_size_group_takes_accumulate_micro_batches_per_rank():
    # A fixed-size run is unchanged (the golden numbers rest on this).
    assert [micro_batches(2, 4, 4, r) for r in range(4)] == [2, 2, 2, 2]
    assert [micro_batches(1, 3, 2, r) for r in range(2)] == [2, 1]


def test_scaling_is_fixed_by_default_and_elastic_with_min_workers():
    fixed = scaling_config(load_config(["train.num_workers=3"]).train)
    assert fixed.num_workers == 3 and fixed.min_workers == fixed.max_workers == 3
    elastic = scaling_config(
        load_config(
            ["train.num_workers=3", "train.min_workers=1", "train.resize_interval_s=5", "train.cpus_per_worker=1"]
        ).train
    )
    assert elastic.num_workers == (1, 3) and (elastic.min_workers, elastic.max_workers) == (1, 3)
    assert elastic.elastic_resize_monitor_interval_s == 5
    assert elastic.resources_per_worker == {"CPU": 1}
    # min_workers equal to num_workers is a fixed group too.
    assert scaling_config(load_config(["train.num_workers=2", "train.min_workers=2"]).train).num_workers == 2


def test_sweep_concurrency_counts_what_the_cluster_can_grow_to():
    from pipeline.tune import concurrent_trials

    cfg = load_config(["train.num_workers=2", "train.min_workers=1"])
    # 3 CPUs up now: one 2-worker trial; the autoscaler may grow the cluster to 17 CPUs: 8.
    assert concurrent_trials(cfg, now={"CPU": 3.0}, most={}) == 1
    assert concurrent_trials(cfg, now={"CPU": 3.0}, most={"CPU": 17.0}) == 7
    # An explicit cap wins over both.
    capped = load_config(["train.num_workers=2", "tune.max_concurrent_trials=3"])
    assert concurrent_trials(capped, now={"CPU": 3.0}, most={"CPU": 17.0}) == 3


def test_a_gpu_group_scaled_to_zero_does_not_serialise_the_sweep():
    from pipeline.tune import concurrent_trials

    gpu = load_config(["train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=1"])
    # No GPU up yet, the autoscaler's maximum is 4: four trials, not one at a time.
    assert concurrent_trials(gpu, now={"CPU": 9.0}, most={"CPU": 9.0, "GPU": 4.0}) == 4
    # No GPU known anywhere: the CPUs decide (the trials wait for the GPUs they ask for).
    assert concurrent_trials(gpu, now={"CPU": 9.0}, most={}) == 7
    # GPUs up now bound it as before.
    assert concurrent_trials(gpu, now={"CPU": 9.0, "GPU": 2.0}, most={}) == 2


def test_the_autoscaler_maximum_is_read_from_the_cluster_launcher_config(tmp_path):
    from pipeline.tune import autoscaler_max_resources

    path = tmp_path / "ray_bootstrap_config.yaml"
    assert autoscaler_max_resources(str(path)) == {}  # no file: unknown
    path.write_text(
        "head_node_type: head\n"
        "available_node_types:\n"
        "  head: {resources: {CPU: 4}, max_workers: 0}\n"
        "  gpu: {resources: {CPU: 8, GPU: 1}, min_workers: 0, max_workers: 3}\n"
    )
    assert autoscaler_max_resources(str(path)) == {"CPU": 28.0, "GPU": 3.0}
    # A node type whose resources Ray detects at start: the maximum is not known here.
    path.write_text(
        "head_node_type: head\navailable_node_types:\n  head: {resources: {CPU: 4}}\n  cpu: {max_workers: 2}\n"
    )
    assert autoscaler_max_resources(str(path)) == {}
