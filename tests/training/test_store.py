"""Activation store format: round trip, commit records, size/sha256 checks naming the shard."""

import json

import numpy as np
import pytest

from training.activations.prompts import PromptRecord, write_prompts
from training.activations.store import (
    FORMAT_VERSION,
    ActivationStore,
    ShardWriter,
    StoreError,
    StoreManifest,
    atomic_write,
    shard_paths,
)

D, T, STEPS = 4, 3, [0, 2]


def manifest(num_prompts=5, per_shard=2) -> StoreManifest:
    return StoreManifest(
        format_version=FORMAT_VERSION, d_in=D, dtype="float16", hook_point="h",
        pipeline_fingerprint="f", scheduler={"class_name": "DDIMScheduler", "config": {}},
        num_inference_steps=3, guidance_scale=4.0, height=32, width=32, tokens_per_step=T,
        timesteps=[900, 500, 100], captured_steps=STEPS, prompts_sha256="x",
        num_prompts=num_prompts, prompts_per_shard=per_shard,
        num_shards=-(-num_prompts // per_shard), command="test")


def rows_of(pid: int) -> np.ndarray:
    return (np.arange(len(STEPS) * T * D).reshape(-1, D) + 100 * pid).astype(np.float16)


def build(tmp_path, shards=None):
    m = manifest()
    atomic_write(tmp_path / "store.json", m.to_json().encode())
    write_prompts(tmp_path / "prompts.jsonl",
                  [PromptRecord(i, f"p{i}", {"colour": "red"}, i) for i in range(m.num_prompts)])
    for s in range(m.num_shards) if shards is None else shards:
        w = ShardWriter(tmp_path, m, s)
        for pid in m.shard_prompts(s):
            w.write_prompt(pid, rows_of(pid))
        w.commit()
    return m


def test_round_trip_memmap_and_records(tmp_path):
    build(tmp_path)
    store = ActivationStore.open(tmp_path)
    assert store.complete and store.shard_ids() == [0, 1, 2]
    assert store.num_rows == 5 * len(STEPS) * T
    arr = store.shard_array(2)
    assert isinstance(arr, np.memmap) and not arr.flags.writeable
    np.testing.assert_array_equal(np.load(shard_paths(tmp_path, 1)[0], mmap_mode="r"),
                                  np.concatenate([rows_of(2), rows_of(3)]))
    recs = store.records()
    assert [(r.prompt_id, r.step, r.timestep, r.shard, r.row_start, r.row_end)
            for r in recs[:3]] == [(0, 0, 900, 0, 0, 3), (0, 2, 100, 0, 3, 6),
                                   (1, 0, 900, 0, 6, 9)]
    r = recs[-1]
    np.testing.assert_array_equal(store.shard_array(r.shard)[r.row_start:r.row_end],
                                  rows_of(4)[T:])
    assert [p.prompt for p in store.prompts()] == [f"p{i}" for i in range(5)]
    store.verify()
    assert not list(tmp_path.rglob("*.partial"))


def test_uncommitted_shards_are_not_counted(tmp_path):
    build(tmp_path, shards=[1])
    m = manifest()
    w = ShardWriter(tmp_path, m, 0)  # in progress: only a .partial exists
    w.write_prompt(0, rows_of(0))
    store = ActivationStore.open(tmp_path)
    assert store.shard_ids() == [1] and not store.complete
    with pytest.raises(StoreError, match=r"00000 .* not committed"):
        store.shard_array(0)
    w.abort()
    assert not list(tmp_path.rglob("*.partial"))


def test_truncated_shard_is_named(tmp_path):
    build(tmp_path)
    npy = shard_paths(tmp_path, 1)[0]
    size = npy.stat().st_size
    with open(npy, "r+b") as f:
        f.truncate(size - 5)
    with pytest.raises(StoreError, match=rf"shards/00001.npy is truncated: {size - 5} of "
                       rf"{size} bytes; delete .* rerun `steer collect`"):
        ActivationStore.open(tmp_path)


def test_corrupt_bytes_named_by_verify(tmp_path):
    build(tmp_path)
    npy = shard_paths(tmp_path, 2)[0]
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path)  # sizes are fine
    with pytest.raises(StoreError, match=r"shards/00002.npy is corrupt"):
        store.verify()


def test_bad_commit_record_and_missing_manifest(tmp_path):
    with pytest.raises(StoreError, match=r"no store\.json"):
        ActivationStore.open(tmp_path)
    build(tmp_path)
    js = shard_paths(tmp_path, 0)[1]
    rec = json.loads(js.read_text())
    js.write_text(json.dumps({**rec, "rows": 1}))
    with pytest.raises(StoreError, match=r"shards/00000.json does not match store.json"):
        ActivationStore.open(tmp_path)
    shard_paths(tmp_path, 0)[0].unlink()
    js.write_text(json.dumps(rec))
    with pytest.raises(StoreError, match=r"shards/00000.npy is missing"):
        ActivationStore.open(tmp_path)
