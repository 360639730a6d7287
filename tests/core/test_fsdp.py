"""FSDP2 on CPU with gloo: 2 and 3 processes equal 1 process over several steps.

Parameters, the EMA teacher (sharded the student's way, updated shard by shard, run
truncated by the Self-Flow objective every step), the projector and the global losses agree
to 1e-5. The model's sizes do not divide by the world size (width 28 over 3 ranks, a
5-channel output layer over 2 and 3), so FSDP's uneven, padded shards are what is tested.

The learning rate is the debug recipe's 1e-3: attention's key bias has a zero gradient in
exact arithmetic, so its gradient is rounding noise that AdamW scales up to ``lr``-sized
steps; at 1e-2 that noise alone moves it by 5e-5 between any two reduction orders.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

STEPS = 5
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3
TOKENS = 8

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(step: int):
    """The global batch of ``step``: the same numbers whatever the world size."""
    from selfflow.core.types import Segment, TokenBatch

    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randn(GLOBAL_BATCH, TOKENS, 5, generator=g)
    hw = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(4), indexing="ij"), -1).reshape(TOKENS, 2)
    positions = torch.cat([torch.zeros(TOKENS, 1, dtype=torch.long), hw], -1).expand(GLOBAL_BATCH, -1, -1)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    return TokenBatch(segments=(Segment(modality="image", tokens=tokens, positions=positions.clone()),), labels=labels)


def _rows(batch, rank: int, world: int):
    from selfflow.core.types import TokenBatch

    n = GLOBAL_BATCH // world
    sl = slice(rank * n, (rank + 1) * n)
    segs = tuple(type(s)(modality=s.modality, tokens=s.tokens[sl], positions=s.positions[sl]) for s in batch.segments)
    return TokenBatch(segments=segs, labels=batch.labels[sl])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from selfflow.core import distributed

    _, dev = distributed.init_distributed("cpu")
    try:
        _train_rank(rank, world, dev, out)
    except BaseException:
        distributed.shutdown(sync=False)
        raise
    distributed.shutdown()  # every rank waits for rank 0's files before any leaves the group


def _train_rank(rank: int, world: int, dev: torch.device, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from selfflow.core import distributed
    from selfflow.core.distill import EMAConfig, EMATeacher
    from selfflow.core.model import FlowTransformer, ModelConfig
    from selfflow.core.objectives import SelfFlow
    from selfflow.core.timesteps import DualTimestepScheduler
    from selfflow.core.train_step import TrainState, train_step

    torch.manual_seed(0)
    model = FlowTransformer(ModelConfig(channels={"image": 5}, width=28, depth=3, heads=2, num_classes=3))
    objective = SelfFlow.for_model(model, scheduler=DualTimestepScheduler(mask_ratio=0.25))
    teacher = EMATeacher(model, EMAConfig(decay=0.5, warmup=False))
    wrapped = distributed.wrap_model(model, dev, "fsdp")
    if world > 1:
        distributed.shard_teacher(teacher, dev)
        assert distributed.shard_heads(objective, dev) == ["projector"]
    opt = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-3, foreach=True)
    state = TrainState(model=wrapped, teacher=teacher, objective=objective, optimizer=opt, sharded=True)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(STEPS):
        result = train_step(state, [_rows(_global_batch(step), rank, world)], generator=gen)
        losses.append(result.global_loss)
    teacher_params = list(teacher.model.parameters())
    uneven = False
    if world > 1:  # sharded all along, and still shards after the truncated forwards
        assert all(isinstance(p, DTensor) for p in [*model.parameters(), *teacher_params])
        assert all(isinstance(p, DTensor) for p in objective.parameters())
        uneven = any(p.to_local().shape[0] * world != p.shape[0] for p in teacher_params)
    tensors = {}
    for part, module in (("model", model), ("teacher", teacher), ("objective", objective)):
        for k, v in module.state_dict().items():
            tensors[f"{part}.{k}"] = distributed.full_tensor(v).detach().clone()
    if rank == 0:
        save_file(tensors, str(Path(out) / f"world{world}.safetensors"))
        (Path(out) / f"world{world}.json").write_text(json.dumps({"losses": losses, "uneven": uneven}))


def _train(tmp_path: Path, world: int) -> tuple[dict[str, torch.Tensor], dict]:
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    info = json.loads((tmp_path / f"world{world}.json").read_text())
    return load_file(str(tmp_path / f"world{world}.safetensors")), info


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("fsdp1"), 1)


def _assert_same(a, b):
    tensors_a, info_a = a
    tensors_b, info_b = b
    assert tensors_a.keys() == tensors_b.keys()
    for k in tensors_a:
        torch.testing.assert_close(tensors_b[k], tensors_a[k], atol=1e-5, rtol=1e-5, msg=k)
    assert info_b["losses"] == pytest.approx(info_a["losses"], abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_fsdp_equals_one_process(tmp_path, one_process, world):
    many = _train(tmp_path, world)
    assert many[1]["uneven"], "some parameter's size should not divide by the world size"
    _assert_same(one_process, many)
    # the comparison is between trained weights: the student moved, the teacher followed
    tensors = one_process[0]
    assert float(tensors["model.final.adaLN.1.weight"].abs().sum()) > 0
    assert not torch.equal(tensors["teacher.model.final.adaLN.1.weight"], tensors["model.final.adaLN.1.weight"])


def _leave(rank: int, port: int, out: str) -> None:
    """Rank 0 writes its file late; rank 1 notes whether the file was there when it left the group."""
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from selfflow.core import distributed

    distributed.init_distributed("cpu")
    if rank == 0:
        time.sleep(1.0)
        (Path(out) / "rank0.done").write_text("")
    distributed.shutdown()
    assert not torch.distributed.is_initialized() and distributed.shard().world == 1
    if rank == 1:
        (Path(out) / "rank1.saw").write_text(str((Path(out) / "rank0.done").exists()))


def test_shutdown_waits_for_every_rank(tmp_path):
    mp.start_processes(_leave, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank1.saw").read_text() == "True"
