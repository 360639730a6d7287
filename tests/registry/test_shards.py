"""Latent shards (``plugins.shards``, ``selfflow encode``): the same batches as the in-memory
path, every item once per epoch across ranks and workers, exact resume across world sizes,
readable by the webdataset library, and bad directories named with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfflow.core.conditioning import ConditionRule
from selfflow.core.distributed import Shard
from selfflow.core.types import Segment
from selfflow.plugins.batching import TokenSource, encode_dataset
from selfflow.plugins.protocols import Example
from selfflow.plugins.shards import ShardData, ShardError, ShardSource, global_order, write_shards

pytest.importorskip("webdataset")


class Ramp:
    """Item i: a 1-D medium of (i % 5) + 1 values, all equal to i (variable lengths: padding)."""

    modalities = ("seq",)
    num_classes = 3
    class_names = ("a", "b", "c")

    def __init__(self, n: int = 37, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        x = torch.full(((i % 5) + 1,), float(i))
        if i == self.bad:
            x[0] = float("nan")
        return Example(media={"seq": x}, label=i % 3)

    def fingerprint(self) -> str:
        return f"ramp-{self.n}-{self.bad}"


class Lift:
    """A fixed tokenizer: a medium of L values -> L tokens of 2 channels (value, value / 2) at
    t = 0..L-1; a stacked batch needs no padding, so ``valid`` is None."""

    modality = "seq"
    mask_ratio = 0.25
    channels = 2

    def __init__(self, key: str = "lift:1") -> None:
        self.key = key

    def fit(self, dataset, *, cache_dir=None, generator=None) -> None:
        pass

    def encode(self, media) -> Segment:
        x = media if isinstance(media, torch.Tensor) else torch.stack(media)
        b, n = x.shape
        pos = torch.zeros(b, n, 3, dtype=torch.long)
        pos[..., 0] = torch.arange(n)
        return Segment(modality="seq", tokens=torch.stack([x, x / 2], dim=-1), positions=pos)

    def decode(self, segment: Segment):
        return segment.tokens[..., 0]

    def cache_key(self) -> str | None:
        return self.key


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(Ramp(), {"seq": Lift()}, out, per_shard=8, chunk=10)
    return out


def ids(batch) -> list[int]:
    return [int(v) for v in batch.segments[0].tokens[:, 0, 0]]


def test_index_and_layout(shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["items"] == 37 and [s["count"] for s in index["shards"]] == [8, 8, 8, 8, 5]
    assert index["segments"]["seq"] == {"tokens": 5, "channels": 2, "padded": True, "dtype": "float32"}
    assert index["tokenizers"] == {"seq": "lift:1"} and index["labels"]
    assert sorted(p.name for p in shards.iterdir()) == [
        "index.json",
        "labels.npy",
        "offsets.npy",
        *[f"shard-{i:06d}.tar" for i in range(5)],
    ]


def test_same_tokens_as_the_in_memory_encoding(shards):
    mem = encode_dataset(Ramp(), {"seq": Lift()}, chunk=10)
    data = ShardData.open(shards)
    idx = torch.tensor([36, 0, 7, 13, 4])
    a, b = mem.take(idx), data.take(idx)
    for sa, sb in zip(a.segments, b.segments):
        assert torch.equal(sa.tokens, sb.tokens) and torch.equal(sa.positions, sb.positions)
        assert torch.equal(sa.valid, sb.valid)
    assert torch.equal(a.labels, b.labels) and torch.equal(mem.labels, data.labels)
    assert b.segments[0].valid.sum(1).tolist() == [(i % 5) + 1 for i in idx.tolist()]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_equal_token_source_across_epochs(shards, workers):
    """Global batch 6 of 37 items for 15 draws (2.4 epochs, batches across epoch ends); the rule
    makes the segment a condition at random: the same draws as the in-memory source."""
    mem = encode_dataset(Ramp(), {"seq": Lift()}, chunk=10)
    rule = ConditionRule(probability={"seq": 0.5})
    a = TokenSource(mem, batch_size=6, seed=5, rule=rule, rule_stream=1)
    b = ShardSource(ShardData.open(shards), batch_size=6, seed=5, rule=rule, rule_stream=1, workers=workers)
    for _ in range(15):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.segments[0].tokens, y.segments[0].tokens)
        assert torch.equal(x.segments[0].valid, y.segments[0].valid)
        assert x.segments[0].role == y.segments[0].role
        assert torch.equal(x.labels, y.labels)
    assert a.position() == b.position()
    assert np.array_equal(global_order(5, 37, 30, 50), a.global_indices(30, 50))


def test_each_item_once_per_epoch_across_ranks_and_workers(shards):
    """3 ranks x 2 workers, global batch 6: the first 6 draws of 37 items hold 36 distinct
    items, and the ranks' rows are disjoint slices of each global batch."""
    data = ShardData.open(shards)
    seen: list[int] = []
    for rank in range(3):
        src = ShardSource(data, batch_size=6, seed=1, shard_=Shard(rank=rank, world=3), workers=2)
        for _ in range(6):
            seen += ids(src.next_batch())
    assert len(seen) == 36 and len(set(seen)) == 36
    assert set(seen) == set(global_order(1, 37, 0, 36).tolist())


def test_resume_on_another_world_size_equals_an_uninterrupted_run(shards):
    """4 draws on 2 ranks, then the checkpointed position continued on 3 ranks and on 1: the
    union of rows per draw equals one process's uninterrupted batches."""
    data = ShardData.open(shards)
    one = ShardSource(data, batch_size=6, seed=2, workers=0)
    want = [ids(one.next_batch()) for _ in range(9)]
    two = [ShardSource(data, batch_size=6, seed=2, shard_=Shard(rank=r, world=2), workers=2) for r in range(2)]
    got = [[i for s in two for i in ids(s.next_batch())] for _ in range(4)]
    position = two[0].position()
    assert position == two[1].position() == {"cursor": 24, "seed": 2, "size": 37}
    three = [ShardSource(data, batch_size=6, seed=2, shard_=Shard(rank=r, world=3), workers=1) for r in range(3)]
    for s in three:
        s.restore(position)
    got += [[i for s in three for i in ids(s.next_batch())] for _ in range(3)]
    single = ShardSource(data, batch_size=6, seed=2, workers=2)
    single.restore(three[0].position())
    got += [ids(single.next_batch()) for _ in range(2)]
    assert got == want


def test_a_shard_window_keeps_reads_local_and_resumes_exactly(shards):
    """``window = 2`` (shards of 8 items): each epoch still holds every item once, read 2 shards
    at a time (3 windows for 5 shards), and 2 ranks then 3 ranks continue one process's batches."""
    from selfflow.plugins.shards import epoch_order

    counts = [8, 8, 8, 8, 5]
    for epoch in range(3):
        order = epoch_order(4, epoch, counts, window=2)
        assert sorted(order.tolist()) == list(range(37))
        windows: list[set[int]] = [set()]  # consecutive positions, at most 2 shards per window
        for shard_id in (i // 8 for i in order.tolist()):
            if shard_id not in windows[-1] and len(windows[-1]) == 2:
                windows.append(set())
            windows[-1].add(shard_id)
        assert len(windows) == 3 and sorted(len(w) for w in windows) == [1, 2, 2]
    assert not np.array_equal(epoch_order(4, 0, counts, 2), epoch_order(4, 1, counts, 2))
    assert np.array_equal(epoch_order(4, 0, counts, 0), np.random.default_rng([4, 0]).permutation(37))

    data = ShardData.open(shards)
    one = ShardSource(data, batch_size=6, seed=4, workers=0, window=2)
    want = [ids(one.next_batch()) for _ in range(8)]
    assert sorted(i for b in want[:6] for i in b) == sorted(epoch_order(4, 0, counts, 2)[:36].tolist())
    two = [
        ShardSource(data, batch_size=6, seed=4, shard_=Shard(rank=r, world=2), workers=1, window=2) for r in range(2)
    ]
    got = [[i for s in two for i in ids(s.next_batch())] for _ in range(5)]
    three = [
        ShardSource(data, batch_size=6, seed=4, shard_=Shard(rank=r, world=3), workers=0, window=2) for r in range(3)
    ]
    for s in three:
        s.restore(two[0].position())
    got += [[i for s in three for i in ids(s.next_batch())] for _ in range(3)]
    assert got == want
    with pytest.raises(ValueError, match="shuffle window of 2 shards, this run 0"):
        ShardSource(data, batch_size=6, seed=4).restore(two[0].position())


def test_restore_drops_what_the_workers_read_ahead(shards):
    data = ShardData.open(shards)
    src = ShardSource(data, batch_size=4, seed=0, workers=2, prefetch=2)
    first = [ids(src.next_batch()) for _ in range(3)]
    src.restore({"cursor": 4, "seed": 0, "size": 37})  # the loop undoing an interrupted step
    assert [ids(src.next_batch()) for _ in range(2)] == first[1:]
    with pytest.raises(ValueError, match="40 items, this one has 37"):
        src.restore({"cursor": 0, "seed": 0, "size": 40})


def test_webdataset_reads_the_shards(shards):
    import webdataset as wds
    from safetensors.torch import load

    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(37)]
    s = samples[12]
    assert json.loads(s["json"]) == {"item": 12, "label": 0}
    assert torch.equal(load(s["safetensors"])["seq.tokens"], torch.tensor([[12.0, 6.0], [12.0, 6.0], [12.0, 6.0]]))


def test_rewrite_is_idempotent_and_another_encoding_is_refused(shards):
    before = (shards / "shard-000000.tar").read_bytes()
    write_shards(Ramp(), {"seq": Lift()}, shards, per_shard=8)  # the same encoding: left as it is
    assert (shards / "shard-000000.tar").read_bytes() == before
    with pytest.raises(ShardError, match="another encoding.*--overwrite"):
        write_shards(Ramp(), {"seq": Lift("lift:2")}, shards)


def test_bad_directories_are_named_with_the_fix(shards, tmp_path):
    with pytest.raises(ShardError, match=r"streams\[0\].shards.*no index.json.*selfflow encode"):
        ShardData.open(tmp_path, key="streams[0].shards")
    data = ShardData.open(shards)
    with pytest.raises(ShardError, match=r"streams\[1\].shards.*tokenizer.*differ.*--overwrite"):
        data.check(Ramp(), {"seq": Lift("lift:2")}, labels=True, key="streams[1].shards")
    with pytest.raises(ShardError, match="dataset changed"):
        data.check(Ramp(n=36), {"seq": Lift()}, labels=True, key="streams[0].shards")
    data.check(Ramp(), {"seq": Lift()}, labels=True, key="x")  # the same: accepted
    with pytest.raises(ValueError, match="item 3 holds NaN"):
        write_shards(Ramp(bad=3), {"seq": Lift()}, tmp_path / "nan", chunk=2)
    with pytest.raises(ValueError, match="do not allow caching"):
        write_shards(Ramp(), {"seq": Lift(key=None)}, tmp_path / "none")
    cut = tmp_path / "cut"
    write_shards(Ramp(), {"seq": Lift()}, cut, per_shard=40)
    (cut / "shard-000000.tar").write_bytes((cut / "shard-000000.tar").read_bytes()[:20_000])
    with pytest.raises(ShardError, match="truncated at item 36"):
        ShardData.open(cut).take([36])
    (cut / "shard-000000.tar").unlink()
    with pytest.raises(ShardError, match="lacks.*shard-000000.tar"):
        ShardData.open(cut)


def test_short_form_and_stream_keys(tmp_path):
    from selfflow.registry.config import ConfigError, load_config

    text = '[modalities.image]\ndataset = "image/digits"\ntokenizer = "image/patch"\n'
    cfg = load_config(text, ["modalities.image.shards=/data/x", "run.data_workers=0"])
    assert cfg.streams[0].shards == "/data/x" and cfg.run.data_workers == 0
    assert load_config(text).streams[0].shards is None
    with pytest.raises(ConfigError, match="run.data_workers"):
        load_config(text, ["run.data_workers=-1"])
    with pytest.raises(ConfigError, match=r"streams\[0\].shard_window.*needs streams\[0\].shards"):
        load_config(text, ["modalities.image.shard_window=2"])
    assert (
        load_config(text, ["modalities.image.shard_window=2", "modalities.image.shards=x"]).streams[0].shard_window == 2
    )


def test_a_resume_may_switch_between_memory_and_shards():
    """Same batches, same position either way: ``streams[i].shards`` may change on resume."""
    from selfflow.registry.config import ConfigError, check_resume, load_config

    text = '[modalities.image]\ndataset = "image/digits"\ntokenizer = "image/patch"\n'
    mem, moved = load_config(text), load_config(text, ["modalities.image.shards=/new/place"])
    assert check_resume(mem, moved, source="test") == ["streams[0].shards"]
    with pytest.raises(ConfigError, match="streams\\[0\\].dataset"):
        check_resume(mem, load_config(text.replace("digits", "mnist")), source="test")


# ----------------------------------------------------------------------------- through the CLI, with gloo

ARGS = [
    "debug",
    "--set",
    "run.batch_size=16",
    "--set",
    "output.progress=false",
    "--set",
    "output.samples=false",
    "--set",
    "run.threads=1",
    "--set",
    "run.data_workers=1",
]


def _run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    d = run / "checkpoints" / f"step_{step:07d}"
    return {f"{p}.{k}": v for p in ("model", "teacher") for k, v in load_file(str(d / f"{p}.safetensors")).items()}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_ranks_on_shards_equal_one_process_in_memory(tmp_path):
    """``selfflow encode`` then: 2 gloo ranks read shards for 2 steps and checkpoint, 1 process
    resumes from that checkpoint to step 4 (a change of world size), against 1 process in
    memory for 4 steps uninterrupted: the same weights and teacher at steps 2 and 4."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SELFFLOW_CACHE": str(tmp_path / "cache")}
    py = [sys.executable, "-m", "selfflow"]
    enc = _run([*py, "encode", "debug", "--out", str(tmp_path / "sh"), "--set", "output.progress=false"], env)
    assert "1617 items" in enc.stdout
    shards = ["--set", f"modalities.image.shards={tmp_path / 'sh'}"]
    mem, sh = tmp_path / "mem", tmp_path / "sh-run"
    _run([*py, "train", *ARGS, "--set", "run.steps=4", "--set", "output.checkpoint_every=2", "--out", str(mem)], env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "selfflow"]
    _run([*torchrun, "train", *ARGS, *shards, "--set", "run.steps=2", "--out", str(sh)], env)
    _run([*py, "train", "--resume", str(sh), "--set", "run.steps=4", "--set", "run.threads=1"], env)
    for step in (2, 4):
        a, b = _weights(mem, step), _weights(sh, step)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=f"step {step}: {k}")
