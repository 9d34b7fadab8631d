"""ActivationLoader: determinism, every row once per epoch (also across ranks), seeking,
thread shutdown, error propagation; MemmapSource over a real store."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor

from training.activations.loader import (
    ActivationLoader,
    BlockSource,
    MemmapSource,
    TensorSource,
)
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

N_ROWS, D_IN = 1000, 4


def indexed_rows(n: int = N_ROWS, d: int = D_IN) -> Tensor:
    """Row i is filled with the value i, so a batch tells which rows it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()


def take(loader: ActivationLoader, batches: int) -> list[Tensor]:
    """The first ``batches`` batches of a loader, closing it afterwards."""
    with loader:
        return list(itertools.islice(loader, batches))


def row_ids(batches: list[Tensor]) -> Tensor:
    """The row indices carried by a list of batches, in stream order."""
    rows = torch.cat(batches)
    assert torch.equal(rows, rows[:, :1].expand_as(rows)), "rows were mixed up"
    return rows[:, 0].long()


def stream(loader: ActivationLoader, rows: int) -> Tensor:
    """The first ``rows`` row ids of a loader's stream."""
    return row_ids(take(loader, -(-rows // loader.batch_size)))[:rows]


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "activation-prefetch"]


def buffer_holding(loader: ActivationLoader, source: BlockSource, batch: int) -> list[int]:
    """The blocks of the buffer holding the first row of ``batch``."""
    epoch, offset = divmod(batch * loader.batch_size, loader.epoch_rows)
    for blocks in loader.epoch_buffers(epoch):
        offset -= sum(source.block_rows()[b] for b in blocks)
        if offset < 0:
            return blocks
    raise AssertionError("batch beyond its epoch")


class CountingSource(BlockSource):
    """A TensorSource that records the blocks it reads and can fail on one."""

    def __init__(self, data: Tensor, block_rows: int, fail_on: int | None = None) -> None:
        self.inner, self.d_in, self.fail_on = TensorSource(data, block_rows), data.shape[1], fail_on
        self.reads: list[int] = []

    def block_rows(self) -> list[int]:
        return self.inner.block_rows()

    def read_block(self, i: int) -> Tensor:
        if i == self.fail_on:
            raise OSError(f"disk error reading block {i}")
        self.reads.append(i)
        return self.inner.read_block(i)


def test_same_seed_same_batches_other_seed_different() -> None:
    source = TensorSource(indexed_rows(), block_rows=37)
    a = take(ActivationLoader(source, 64, seed=3, buffer_blocks=4), 40)
    b = take(ActivationLoader(source, 64, seed=3, buffer_blocks=4), 40)
    c = take(ActivationLoader(source, 64, seed=4, buffer_blocks=4), 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(c))


@pytest.mark.parametrize("batch_size, buffer_blocks", [(64, 4), (7, 1), (300, 2), (1000, 64)])
def test_one_epoch_holds_every_row_once(batch_size: int, buffer_blocks: int) -> None:
    loader = ActivationLoader(TensorSource(indexed_rows(), 37), batch_size,
                              buffer_blocks=buffer_blocks)
    assert loader.epoch_rows == N_ROWS
    two_epochs = stream(loader, 2 * N_ROWS)
    first, second = two_epochs[:N_ROWS], two_epochs[N_ROWS:]
    assert torch.equal(first.sort().values, torch.arange(N_ROWS))
    assert torch.equal(second.sort().values, torch.arange(N_ROWS))
    assert not torch.equal(first, second), "epochs should be shuffled differently"
    assert not torch.equal(first, torch.arange(N_ROWS)), "rows should be shuffled"


def test_two_ranks_split_an_epoch_disjointly() -> None:
    source = TensorSource(indexed_rows(), block_rows=37)
    loaders = [ActivationLoader(source, 50, seed=1, buffer_blocks=3, rank=r, world_size=2)
               for r in range(2)]
    epochs = [stream(loader, loader.epoch_rows) for loader in loaders]
    assert sum(loader.epoch_rows for loader in loaders) == N_ROWS
    assert not set(epochs[0].tolist()) & set(epochs[1].tolist())
    assert torch.equal(torch.cat(epochs).sort().values, torch.arange(N_ROWS))


def test_start_batch_resumes_the_same_stream_across_an_epoch() -> None:
    data = indexed_rows()
    fresh = take(ActivationLoader(TensorSource(data, 37), 64, seed=5, buffer_blocks=4), 40)
    for start in (1, 9, 14, 15, 31):  # epoch 0 ends inside batch 15 (1000 / 64 = 15.6)
        source = CountingSource(data, 37)
        loader = ActivationLoader(source, 64, seed=5, buffer_blocks=4, start_batch=start)
        resumed = take(loader, 40 - start)
        assert all(torch.equal(x, y) for x, y in zip(fresh[start:], resumed, strict=True))
        assert source.reads[0] == buffer_holding(loader, source, start)[0], \
            "the resumed loader read a buffer before the one holding start_batch"


def test_close_stops_the_prefetch_thread() -> None:
    source = TensorSource(indexed_rows(), block_rows=10)
    with ActivationLoader(source, 16, buffer_blocks=2, prefetch_buffers=1) as loader:
        batches = iter(loader)
        next(batches)
        assert prefetch_threads()
    assert not prefetch_threads()
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(loader)
    batches = iter(ActivationLoader(source, 16, buffer_blocks=2))
    next(batches)
    del batches  # a consumer that stops early without close(): the stream closes the loader
    assert not prefetch_threads()


def test_read_error_reaches_the_consumer() -> None:
    source = CountingSource(indexed_rows(), block_rows=37, fail_on=11)
    with pytest.raises(OSError, match="block 11"):
        take(ActivationLoader(source, 64, buffer_blocks=4), 100)
    assert not prefetch_threads()


def test_half_precision_source_and_output_dtype() -> None:
    source = TensorSource(indexed_rows().half(), block_rows=37)
    (batch,) = take(ActivationLoader(source, 32), 1)
    assert batch.dtype == torch.float32 and batch.shape == (32, D_IN)
    (batch,) = take(ActivationLoader(source, 32, dtype=torch.bfloat16), 1)
    assert batch.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: compares the loader's device batches with its CPU "
                    "batches (the CPU path is tested above)")
def test_cuda_batches_equal_cpu_batches() -> None:
    source = TensorSource(indexed_rows().half(), block_rows=37)
    cpu = take(ActivationLoader(source, 64, seed=1, buffer_blocks=3), 40)
    cuda = take(ActivationLoader(source, 64, seed=1, buffer_blocks=3, device="cuda"), 40)
    assert all(y.is_cuda and torch.equal(x, y.cpu()) for x, y in zip(cpu, cuda, strict=True))


def test_invalid_arguments_are_refused() -> None:
    source = TensorSource(indexed_rows(10), block_rows=5)
    with pytest.raises(ValueError, match="cannot be dealt"):
        ActivationLoader(source, 4, world_size=3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        ActivationLoader(source, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        ActivationLoader(source, 0)


def write_store(directory: Path, num_prompts: int, first_row: int = 0) -> StoreManifest:
    """A store whose row i (counting from ``first_row``) holds the value i (exact in float16)."""
    manifest = StoreManifest(
        format_version=FORMAT_VERSION, d_in=D_IN, dtype="float16", hook_point="h",
        pipeline_fingerprint="f", scheduler={}, num_inference_steps=3, guidance_scale=4.0,
        height=32, width=32, tokens_per_step=16, timesteps=[900, 500, 100],
        captured_steps=[0, 2], prompts_sha256="x", num_prompts=num_prompts,
        prompts_per_shard=2, num_shards=-(-num_prompts // 2), command="test_loader")
    directory.mkdir()
    atomic_write(directory / "store.json", manifest.to_json().encode())
    write_prompts(directory / "prompts.jsonl",
                  [PromptRecord(i, f"p{i}", {}, i) for i in range(num_prompts)])
    per_prompt = manifest.rows_per_prompt
    for shard in range(manifest.num_shards):
        writer = ShardWriter(directory, manifest, shard)
        for pid in manifest.shard_prompts(shard):
            start = first_row + pid * per_prompt
            writer.write_prompt(pid, indexed_rows(start + per_prompt)[start:].numpy())
        writer.commit()
    return manifest


def test_memmap_source_over_two_stores_covers_every_row(tmp_path: Path) -> None:
    write_store(tmp_path / "a", num_prompts=7)  # 4 shards: 64, 64, 64, 32 rows
    write_store(tmp_path / "b", num_prompts=3, first_row=224)
    stores = [ActivationStore.open(tmp_path / "a"), ActivationStore.open(tmp_path / "b")]
    source = MemmapSource(stores, chunk_rows=24)
    assert source.d_in == D_IN
    assert source.block_rows() == [24, 24, 16] * 3 + [24, 8] + [24, 24, 16, 24, 8]
    block = source.read_block(2)
    assert block.dtype == torch.float16 and torch.equal(block[:, 0], torch.arange(48, 64).half())
    total = sum(source.block_rows())
    assert total == 320
    loader = ActivationLoader(source, 50, seed=2, buffer_blocks=3)
    assert torch.equal(stream(loader, total).sort().values, torch.arange(total))


def test_parallel_reads_give_the_same_stream(tmp_path: Path) -> None:
    write_store(tmp_path / "a", num_prompts=7)
    store = ActivationStore.open(tmp_path / "a")
    one, four = (MemmapSource([store], chunk_rows=10, read_threads=n) for n in (1, 4))
    assert (one.read_threads, four.read_threads) == (1, 4)
    a = take(ActivationLoader(one, 50, seed=5, buffer_blocks=6), 20)
    b = take(ActivationLoader(four, 50, seed=5, buffer_blocks=6), 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(row_ids(b)[:224].sort().values, torch.arange(224))  # one whole epoch


def test_read_error_on_a_read_thread_reaches_the_consumer() -> None:
    source = CountingSource(indexed_rows(), block_rows=37, fail_on=11)
    source.read_threads = 3
    with pytest.raises(OSError, match="block 11"):
        take(ActivationLoader(source, 64, buffer_blocks=4), 100)
    assert not prefetch_threads()
    assert not [t for t in threading.enumerate() if t.name.startswith("activation-read")]


def test_truncated_shard_is_named(tmp_path: Path) -> None:
    write_store(tmp_path / "s", num_prompts=5)
    store = ActivationStore.open(tmp_path / "s")
    npy = shard_paths(tmp_path / "s", 1)[0]
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 10)
    with pytest.raises(StoreError, match=r"00001\.npy is truncated"):
        MemmapSource([store])
    with pytest.raises(StoreError, match=r"00001\.npy is truncated"):
        ActivationStore.open(tmp_path / "s")


def test_shard_truncated_while_training_is_named(tmp_path: Path) -> None:
    write_store(tmp_path / "s", num_prompts=5)
    source = MemmapSource([ActivationStore.open(tmp_path / "s")], chunk_rows=64)
    npy = shard_paths(tmp_path / "s", 1)[0]
    with open(npy, "r+b") as f:  # after the source checked it: a read must still say so
        f.truncate(npy.stat().st_size - 10)
    with pytest.raises(StoreError, match=r"00001\.npy: short read"):
        source.read_block(1)
