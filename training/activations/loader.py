"""Activation loader: block sources and a deterministic, seekable, prefetching shuffle loader.

A source splits its rows into blocks that are each read with one contiguous read. The loader
deals blocks to ranks, shuffles block order per epoch, fills buffers of ``buffer_blocks`` blocks
on a background thread, shuffles the rows inside each buffer and cuts the stream into batches.
Every random choice comes from a generator seeded by a stable hash of (seed, epoch, rank, ...),
so a stream is reproducible and ``start_batch`` can seek into it by arithmetic alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from training.activations.store import ActivationStore, StoreError, redo_advice, shard_problem

_POLL_S = 0.1  # how often blocked queue operations look at the stop flag


class BlockSource(Protocol):
    """Rows of activations split into blocks, each read with one contiguous read.

    A source may also have ``read_threads`` (how many blocks the loader may read at once from
    different threads; 1 when absent) and ``will_need`` (a read-ahead hint).
    """

    d_in: int

    def block_rows(self) -> list[int]:
        """Rows of every block, in block order."""
        ...

    def read_block(self, i: int) -> Tensor:
        """Block ``i`` as a CPU tensor [block_rows()[i], d_in] of any float dtype; it may be a
        view (of a memmap, say): the loader copies it into its buffer and does not keep it."""
        ...

    def will_need(self, i: int) -> None:
        """Optional hint that block ``i`` is read next: a file-backed source starts reading it
        from storage now, so the disk works while the loader shuffles the current block."""


class TensorSource(BlockSource):
    """An in-memory tensor [N, d_in] cut into blocks of ``block_rows`` rows (last may be short)."""

    def __init__(self, data: Tensor, block_rows: int) -> None:
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"TensorSource needs a non-empty [N, d_in] tensor, "
                             f"got {tuple(data.shape)}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.data, self.d_in = data.detach(), int(data.shape[1])
        self._starts = list(range(0, data.shape[0], block_rows))
        self._rows = [min(block_rows, data.shape[0] - s) for s in self._starts]

    def block_rows(self) -> list[int]:
        """Rows of every block, in block order."""
        return list(self._rows)

    def read_block(self, i: int) -> Tensor:
        """Rows [i * block_rows, ...) of the tensor (a view)."""
        return self.data[self._starts[i]:self._starts[i] + self._rows[i]]


class MemmapSource(BlockSource):
    """Committed shards of activation stores as blocks of at most ``chunk_rows`` rows.

    A block never crosses a shard, so reading it is one contiguous read of that shard's file:
    the block's byte range is memory-mapped on its own (with ``MADV_WILLNEED``, so a cold
    block is read ahead in one go) and unmapped when the loader drops the view after copying
    it. One block mapped at a time: touched pages of a mapping count in the process's unique
    memory, so a mapping of the whole store would grow it with the rows read. Mapping instead
    of ``pread`` saves a copy (the loader's shuffle reads straight from the page cache).
    Shard sizes are checked here and on every read (StoreError naming the shard).
    """

    def __init__(self, stores: Sequence[ActivationStore], chunk_rows: int = 4096,
                 read_threads: int | None = None) -> None:
        """``read_threads``: blocks the loader reads and shuffles at once (default: half the
        CPUs, at most 8; one thread shuffles about 2 M rows/s of d_in 1280, a GPU eats more)."""
        if not stores:
            raise ValueError("MemmapSource needs at least one activation store")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        d_ins = {store.manifest.d_in for store in stores}
        if len(d_ins) != 1:
            names = ", ".join(f"{s.directory} (d_in {s.manifest.d_in})" for s in stores)
            raise ValueError(f"stores with different d_in cannot be mixed: {names}")
        self.d_in = d_ins.pop()
        self.read_threads = read_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._files: list[tuple[Path, int, np.dtype]] = []  # (path, data offset, dtype)
        self._blocks: list[tuple[int, int, int]] = []  # (file index, row start, row end)
        for store in stores:
            for shard in store.shard_ids():
                problem = shard_problem(store.directory, store.manifest, shard)
                if problem is not None:
                    raise StoreError(f"store {store.directory}: " + redo_advice(problem))
                rows = store.shard_rows(shard)
                array = store.shard_array(shard)
                self._files.append((Path(array.filename), array.offset, array.dtype))
                del array  # drop the mapping: blocks are read with pread
                for start in range(0, rows, chunk_rows):
                    end = min(start + chunk_rows, rows)
                    self._blocks.append((len(self._files) - 1, start, end))
        if not self._blocks:
            names = ", ".join(str(s.directory) for s in stores)
            raise ValueError(f"no committed rows in {names}: run `steer collect` first")

    def block_rows(self) -> list[int]:
        """Rows of every block, in block order (stores, then shards, then chunks)."""
        return [end - start for _, start, end in self._blocks]

    def will_need(self, i: int) -> None:
        """Ask the kernel to read block ``i``'s bytes into the page cache in the background."""
        file, start, end = self._blocks[i]
        path, offset, dtype = self._files[file]
        row_bytes = self.d_in * dtype.itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset + start * row_bytes, (end - start) * row_bytes,
                             os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read_block(self, i: int) -> Tensor:
        """The block's rows as a read-only view of a mapping of just that byte range; the
        mapping is released with the last reference to the view (the loader copies at once)."""
        file, start, end = self._blocks[i]
        path, offset, dtype = self._files[file]
        first = offset + start * self.d_in * dtype.itemsize
        aligned = first - first % mmap.ALLOCATIONGRANULARITY
        want = (end - start) * self.d_in * dtype.itemsize
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if first + want > size:
                raise StoreError(f"{path}: short read ({max(0, size - first)} of {want} bytes "
                                 f"at row {start}); the shard was truncated after the store "
                                 "was opened — delete it and its .json and rerun `steer collect` "
                                 "to redo it")
            mapping = mmap.mmap(f.fileno(), first - aligned + want, access=mmap.ACCESS_READ,
                                offset=aligned)
        mapping.madvise(mmap.MADV_WILLNEED)
        rows = np.frombuffer(mapping, dtype, (end - start) * self.d_in, first - aligned)
        with warnings.catch_warnings():  # read-only view: the loader only copies from it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(rows.reshape(end - start, self.d_in))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints, stable across processes (sha256, not ``hash()``)."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _randperm(n: int, *seed_parts: int) -> Tensor:
    """``randperm(n)`` from a generator seeded with ``derive_seed(*seed_parts)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(*seed_parts)))


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _scatter_rows(out: Tensor, index: Tensor, rows: Tensor) -> None:
    """``out[index] = rows``: with numpy where it can (single-threaded, so the prefetch thread
    does not start a second OpenMP team beside the consumer's), else with torch."""
    if out.dtype in _NUMPY_DTYPES:
        out.numpy()[index.numpy()] = rows.numpy()
    else:
        out.index_copy_(0, index, rows)


@dataclass(frozen=True)
class _Failure:
    """An exception raised on the prefetch thread, carried to the consumer."""

    error: BaseException


class ActivationLoader:
    """Infinite, deterministic, seekable stream of shuffled [batch_size, d_in] batches.

    Memory holds at most ``prefetch_buffers + 2`` buffers of ``buffer_blocks`` blocks, whatever
    the dataset size. Iterate once; call ``close()`` (or use ``with``) to stop the prefetch thread.
    """

    def __init__(self, source: BlockSource, batch_size: int, seed: int = 0,
                 buffer_blocks: int = 64, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, prefetch_buffers: int = 2) -> None:
        for name, value in [("batch_size", batch_size), ("buffer_blocks", buffer_blocks),
                            ("world_size", world_size), ("prefetch_buffers", prefetch_buffers)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.buffer_blocks, self.rank, self.world_size = buffer_blocks, rank, world_size
        self.start_batch, self.device, self.dtype = start_batch, torch.device(device), dtype
        self._rows = source.block_rows()
        self._read_threads = max(1, int(getattr(source, "read_threads", 1)))
        if len(self._rows) < world_size:
            raise ValueError(f"{len(self._rows)} blocks cannot be dealt to {world_size} ranks: "
                             "use a smaller chunk_rows / block size or fewer ranks")
        self._blocks = _randperm(len(self._rows), seed)[rank::world_size].tolist()
        self.epoch_rows = sum(self._rows[b] for b in self._blocks)
        own = sorted((self._rows[b] for b in self._blocks), reverse=True)
        self._capacity = sum(own[:buffer_blocks])  # rows of the largest possible buffer
        self._queue: queue.Queue[tuple[Tensor, int] | _Failure] = \
            queue.Queue(maxsize=prefetch_buffers)
        self._spares: queue.SimpleQueue[Tensor] = queue.SimpleQueue()  # consumed CPU buffers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def epoch_buffers(self, epoch: int) -> list[list[int]]:
        """The source block ids of each buffer of ``epoch`` on this rank, in stream order."""
        order = _randperm(len(self._blocks), self.seed, epoch, self.rank).tolist()
        blocks = [self._blocks[i] for i in order]
        return [blocks[i:i + self.buffer_blocks] for i in range(0, len(blocks), self.buffer_blocks)]

    def _start(self) -> tuple[int, int, int]:
        """(epoch, buffer index, row offset in that buffer) where ``start_batch`` begins."""
        epoch, offset = divmod(self.start_batch * self.batch_size, self.epoch_rows)
        for index, blocks in enumerate(self.epoch_buffers(epoch)):
            rows = sum(self._rows[b] for b in blocks)
            if offset < rows:
                return epoch, index, offset
            offset -= rows
        raise AssertionError("offset beyond the epoch")  # unreachable: offset < epoch_rows

    def _memory(self, dtype: torch.dtype) -> Tensor:
        """Room for the largest buffer: a consumed one on CPU (no fresh pages), else new
        (pinned for CUDA, where torch's pinned allocator does the reuse and tracks copies)."""
        try:
            spare = self._spares.get_nowait()
            if spare.dtype == dtype:
                return spare
        except queue.Empty:
            pass
        if self.device.type == "cuda" or dtype not in _NUMPY_DTYPES:
            return torch.empty(self._capacity, self.source.d_in, dtype=dtype,
                               pin_memory=self.device.type == "cuda")
        # numpy asks for transparent huge pages on large arrays: first touch of a fresh
        # buffer page-faults 512x less often (about 4x faster to fill here than torch.empty)
        return torch.from_numpy(np.empty((self._capacity, self.source.d_in),
                                         _NUMPY_DTYPES[dtype]))

    def _read_block(self, block: int) -> Tensor:
        """``source.read_block(block)``, checked against the shape the source announced."""
        rows = self.source.read_block(block)
        if tuple(rows.shape) != (self._rows[block], self.source.d_in):
            raise ValueError(f"block {block} has shape {tuple(rows.shape)}, the source "
                             f"announced ({self._rows[block]}, {self.source.d_in})")
        return rows

    def _read_buffer(self, epoch: int, index: int, blocks: list[int],
                     pool: ThreadPoolExecutor | None) -> tuple[Tensor, int] | None:
        """Read ``blocks`` into memory in the buffer's shuffled row order: (memory, rows) whose
        first ``rows`` rows are the buffer; None if stopped. Each block has its own rows of the
        buffer, so the pool's threads read and scatter blocks in any order, same result."""
        total = sum(self._rows[b] for b in blocks)
        perm = _randperm(total, self.seed, epoch, self.rank, index)
        target = torch.empty_like(perm)
        target[perm] = torch.arange(total)  # row j of the concatenated blocks goes to target[j]
        starts = list(itertools.accumulate((self._rows[b] for b in blocks), initial=0))
        will_need = getattr(self.source, "will_need", None)
        ahead = self._read_threads

        def place(k: int, rows: Tensor | None = None) -> bool:
            """Read block k (unless given) and scatter it to its rows; False if stopped."""
            if self._stop.is_set():
                return False
            if will_need is not None and k + ahead < len(blocks):
                will_need(blocks[k + ahead])  # storage reads ahead while this block scatters
            rows = self._read_block(blocks[k]) if rows is None else rows
            _scatter_rows(memory, target[starts[k]:starts[k + 1]], rows.to(memory.dtype))
            return True

        if will_need is not None:
            for block in blocks[:ahead]:
                will_need(block)
        first = self._read_block(blocks[0])
        memory = self._memory(first.dtype)  # the source's dtype, known from its first block
        rest = range(1, len(blocks))
        placed = [place(0, first), *(pool.map(place, rest) if pool else map(place, rest))]
        return (memory, total) if all(placed) else None

    def _put(self, item: tuple[Tensor, int] | _Failure) -> bool:
        """Put ``item`` on the queue unless the loader is stopped; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        """Prefetch thread: fill buffers in stream order from the start position, forever."""
        try:
            epoch, index, _ = self._start()
            threads = self._read_threads
            with ThreadPoolExecutor(threads, "activation-read") if threads > 1 \
                    else contextlib.nullcontext() as pool:
                while True:
                    buffers = self.epoch_buffers(epoch)
                    for i in range(index, len(buffers)):
                        buffer = self._read_buffer(epoch, i, buffers[i], pool)
                        if buffer is None or not self._put(buffer):
                            return
                    epoch, index = epoch + 1, 0
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(_Failure(error))

    def _next_buffer(self) -> tuple[Tensor, int] | None:
        """The next (memory, rows) from the prefetch thread; re-raises its error; None if closed."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item
        return None

    def _assemble(self, parts: list[Tensor]) -> Tensor:
        """A batch from buffer slices: converted on CPU; copied non-blocking, converted on GPU."""
        if len(parts) == 1 and self.device.type == "cpu":
            return parts[0].to(self.dtype, copy=True)  # a conversion kernel: 2.5× copy_'s speed
        stage = self.dtype if self.device.type == "cpu" else parts[0].dtype
        out = torch.empty(self.batch_size, self.source.d_in, dtype=stage, device=self.device)
        start = 0
        for part in parts:
            out[start:start + len(part)].copy_(part, non_blocking=True)
            start += len(part)
        return out.to(self.dtype)

    def __iter__(self) -> Iterator[Tensor]:
        """Start the prefetch thread and return the infinite batch stream (once per loader)."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("an ActivationLoader is iterated once; make a new one "
                               "(start_batch=... to continue where this one stopped)")
        self._thread = threading.Thread(target=self._produce, name="activation-prefetch",
                                        daemon=True)
        self._thread.start()
        return self._batches()

    def _batches(self) -> Iterator[Tensor]:
        """Cut the buffers into batches; batches span buffer and epoch boundaries."""
        try:
            position, item = self._start()[2], self._next_buffer()
            while item is not None:
                parts, done, need = [], [], self.batch_size
                while need:
                    memory, rows = item
                    if position == rows:
                        done.append(memory)
                        item, position = self._next_buffer(), 0
                        if item is None:
                            return
                        memory, rows = item
                    take = min(need, rows - position)
                    parts.append(memory[position:position + take])
                    position, need = position + take, need - take
                batch = self._assemble(parts)
                if self.device.type == "cpu":  # the batch is a copy: consumed memory is free
                    for memory in done:
                        self._spares.put(memory)
                yield batch
        finally:
            self.close()

    def close(self) -> None:
        """Stop and join the prefetch thread and drop the prefetched buffers (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()
        while not self._spares.empty():
            self._spares.get_nowait()

    def __enter__(self) -> ActivationLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
