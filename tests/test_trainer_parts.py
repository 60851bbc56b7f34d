"""The loop's arithmetic: batch plan, learning-rate schedule, data position."""

import math

import pytest

from rltune.config import BatchPlan, ConfigError, TrainConfig, check_groups
from rltune.data.stream import IndexStream, length_sorted
from rltune.trainer import lr_lambda


def test_batch_plan_derives_accumulation():
    plan = BatchPlan.from_config(TrainConfig(batch_size=32, micro_batch_size=8), world_size=2)
    assert (plan.batch_size, plan.grad_accum) == (32, 2)


def test_batch_plan_grad_accum_takes_precedence():
    plan = BatchPlan.from_config(
        TrainConfig(batch_size=16, micro_batch_size=4, grad_accum=3), world_size=1
    )
    assert (plan.batch_size, plan.grad_accum) == (12, 3)


def test_batch_plan_rejects_indivisible_batch_naming_keys():
    with pytest.raises(ConfigError, match=r"train.batch_size=10 .*train.micro_batch_size \(4\)"):
        BatchPlan.from_config(TrainConfig(batch_size=10, micro_batch_size=4), world_size=1)


def test_warmup_then_cosine_by_hand():
    """max_steps=10, warmup_ratio=0.2 -> 2 warmup steps: factors 1/3, 2/3; then cosine over the
    remaining 8 steps: step i has progress (i-2)/8, factor (1+cos(pi*progress))/2."""
    f = lr_lambda(TrainConfig(warmup_ratio=0.2, scheduler="cosine"), 10)
    assert f(0) == pytest.approx(1 / 3)
    assert f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)


def test_linear_and_constant_with_floor():
    lin = lr_lambda(TrainConfig(scheduler="linear", min_lr_ratio=0.1), 4)
    assert [round(lin(i), 6) for i in range(5)] == [1.0, 0.775, 0.55, 0.325, 0.1]
    const = lr_lambda(TrainConfig(scheduler="constant"), 4)
    assert {const(i) for i in range(4)} == {1.0}


def test_stream_covers_each_epoch_once_and_resumes_exactly():
    s = IndexStream(10, seed=3)
    first_epoch = s.take(4) + s.take(4) + s.take(2)
    assert sorted(first_epoch) == list(range(10))
    s.take(3)
    state = s.state_dict()
    expected = s.take(9)  # crosses into epoch 2
    resumed = IndexStream(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(9) == expected
    assert state == {"epoch": 1, "offset": 3}


def test_stream_shards_between_ranks_without_overlap():
    ranks = [IndexStream(8, seed=0, rank=r, world_size=2) for r in range(2)]
    got = [ranks[0].take(2), ranks[1].take(2)]
    assert set(got[0]).isdisjoint(got[1])
    assert len(set(got[0]) | set(got[1])) == 4


def test_one_take_per_step_is_the_takes_per_micro_batch():
    """Algorithms take a step's indices at once to sort them by length: the same indices as
    one take per micro-batch, on every rank."""
    for rank in range(2):
        a = IndexStream(11, seed=5, rank=rank, world_size=2)
        b = IndexStream(11, seed=5, rank=rank, world_size=2)
        assert a.take(3 * 4) == b.take(3) + b.take(3) + b.take(3) + b.take(3)


def test_length_sorted_micro_batches_pad_less():
    lengths = [9, 2, 30, 3, 28, 8, 2, 31]
    chunks = length_sorted(list(range(8)), 2, key=lambda i: lengths[i])
    assert sorted(i for c in chunks for i in c) == list(range(8))  # every index, once
    assert [[lengths[i] for i in c] for c in chunks] == [[2, 2], [3, 8], [9, 28], [30, 31]]

    def padding(groups):  # tokens added to pad each micro-batch to its longest row
        return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)

    assert padding(chunks) == 0 + 5 + 19 + 1
    assert padding([[0, 1], [2, 3], [4, 5], [6, 7]]) == 7 + 27 + 20 + 29


def test_memory_metrics_report_the_process_peak_on_cpu():
    """On a CPU only the resident-memory peak is reported, and it follows an allocation: a
    block written (so resident) of 1 GiB more than the peak before it, which on Linux includes
    the parent's resident memory when the process was forked, so the block must outgrow it."""
    import json
    import subprocess
    import sys

    script = """
import json, math, torch
from rltune.profiling import memory_metrics
before = memory_metrics(torch.device("cpu"))
gib = math.ceil(before["memory/peak_rss_gib"]) + 1
block = torch.ones(gib * 2**28)
print(json.dumps([before, memory_metrics(torch.device("cpu")), gib]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    before, after, gib = json.loads(proc.stdout)
    assert set(before) == set(after) == {"memory/peak_rss_gib"}
    assert after["memory/peak_rss_gib"] >= gib * 0.98 > before["memory/peak_rss_gib"] + 0.9


def _shared_denominator_worker(rank: int, port: int, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from rltune.distributed import shared_denominator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cpu = torch.device("cpu")
        # rank 0 has no loss tokens this step, rank 1 has three with per-token losses 1, 2, 6
        tokens = [torch.zeros(0), torch.tensor([1.0, 2.0, 6.0])][rank]
        denominator = shared_denominator(float(len(tokens)), cpu)
        share = tokens.sum().item() / denominator
        nothing = shared_denominator(0.0, cpu)
        shares = [None, None]
        dist.all_gather_object(shares, share)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"denominator": denominator, "mean": sum(shares) / 2, "none": nothing}, f)
    finally:
        dist.destroy_process_group()


def test_a_rank_without_tokens_leaves_the_step_mean_exact(tmp_path):
    """Two ranks, 0 and 3 loss tokens: each divides by (0 + 3) / 2, so the mean over ranks (what
    DeepSpeed does to gradients, and merge_ranks to metrics) is the mean over the 3 tokens. The
    floor of 1 applies to the total: with a per-rank floor it would have been 4 / 2."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    mp.spawn(_shared_denominator_worker, args=(port, str(out)), nprocs=2)
    result = json.loads(out.read_text())
    assert result["denominator"] == pytest.approx(1.5)
    assert result["mean"] == pytest.approx(3.0)  # (1 + 2 + 6) / 3
    assert result["none"] == pytest.approx(0.5)  # nothing anywhere: 1 / 2, never a division by 0


def test_one_process_denominator_has_a_floor_of_one():
    import torch

    from rltune.distributed import shared_denominator

    assert shared_denominator(0.0, torch.device("cpu")) == 1.0
    assert shared_denominator(7.0, torch.device("cpu")) == 7.0


@pytest.mark.parametrize(
    ("train", "world_size", "group_size", "hint"),
    [
        (TrainConfig(batch_size=256, micro_batch_size=128), 1, 7, "train.batch_size=896"),
        (TrainConfig(batch_size=24, micro_batch_size=4), 2, 8, "train.batch_size=32"),
        (TrainConfig(micro_batch_size=4, grad_accum=3), 1, 8, "train.grad_accum=4"),
    ],
)
def test_a_batch_of_broken_groups_gets_a_hint_that_works(train, world_size, group_size, hint):
    """The suggested setting must itself pass both the micro-batch and the group arithmetic."""
    plan = BatchPlan.from_config(train, world_size)
    with pytest.raises(ConfigError, match=f"algo.group_size={group_size}; e.g. {hint}$"):
        check_groups(plan, group_size, explicit_accum=train.grad_accum is not None)
    key, value = hint.split("=")
    fixed = TrainConfig(**{**vars(train), key.split(".")[1]: int(value)})
    check_groups(BatchPlan.from_config(fixed, world_size), group_size, explicit_accum=True)
