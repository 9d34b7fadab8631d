"""`steer collect`: run the pipeline recording the hook block and write an activation store.

The UNet runs in the calling thread; a writer thread takes each prompt's rows from a bounded
queue and streams them into the shard being written, so generation waits for the disk only
when the queue is full. Shards are committed atomically (see :mod:`.store`); a rerun deletes
partial files, re-checks committed shards, redoes what is missing or bad and skips the rest,
which makes an interrupted-then-resumed store byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from steering.bundle import scheduler_description
from steering.fingerprint import HOOK_POINT, pipeline_fingerprint
from steering.hooks import cond_half
from steering.pipeline import ensure_ddim, pipeline_default_size
from steering.recording import recording
from training.activations.prompts import PromptRecord, parse_prompts
from training.activations.store import (
    FORMAT_VERSION,
    MANIFEST,
    PARTIAL,
    PROMPTS,
    ActivationStore,
    ShardWriter,
    StoreError,
    StoreManifest,
    atomic_write,
    partial_path,
    read_manifest,
    remove_shard,
    shard_paths,
    shard_problem,
)

# Commit-record bytes per (prompt, step) record, for the disk estimate (generous).
_RECORD_BYTES = 48


class CollectError(RuntimeError):
    """Collection cannot start or go on; the message says why and what to do."""


def schedule_timesteps(pipe: Any, steps: int) -> list[int]:
    """The DDIM timesteps of a ``steps``-step run (the pipeline's own scheduler is untouched)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def parse_steps(spec: str, steps: int) -> list[int] | None:
    """Captured step indices from "all", "0,5,10", "0:50:5" or a mix ("0:10,49"); None = all."""
    if spec.strip().lower() == "all":
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            if ":" in part:
                bounds = [int(x) if x.strip() else None for x in part.split(":")]
                if len(bounds) > 3:
                    raise ValueError(part)
                out.update(range(steps)[slice(*bounds)])
            else:
                out.add(int(part))
    except ValueError as e:
        raise ValueError(f"capture steps {spec!r}: use 'all', '0,5,10' or 'start:stop:step'"
                         ) from e
    bad = sorted(s for s in out if not 0 <= s < steps)
    if bad or not out:
        raise ValueError(f"capture steps {spec!r}: step indices must lie in 0..{steps - 1} "
                         f"(got {bad or 'none'})")
    return sorted(out)


class _Stop(Exception):
    pass


@torch.no_grad()
def probe_hook_point(pipe: Any, height: int, width: int,
                     hook_point: str = HOOK_POINT) -> tuple[int, int]:
    """(tokens per image, channels) at the hook point, from one UNet forward cut short there."""
    unet = pipe.unet
    block = unet.get_submodule(hook_point)
    seen: dict[str, torch.Size] = {}

    def stop(step: int, timestep: int, row: int | None, x: Tensor) -> None:
        seen["shape"] = x.shape
        raise _Stop

    vsf = pipe.vae_scale_factor
    latent = torch.zeros(1, unet.config.in_channels, height // vsf, width // vsf,
                         device=unet.device, dtype=unet.dtype)
    context = torch.zeros(1, pipe.tokenizer.model_max_length,
                          pipe.text_encoder.config.hidden_size, device=unet.device,
                          dtype=unet.dtype)
    try:
        with recording(unet, {block: stop}):
            unet(latent, torch.tensor([1], device=unet.device), encoder_hidden_states=context)
    except _Stop:
        pass
    if "shape" not in seen:
        raise CollectError(f"the UNet forward never reached {hook_point!r}")
    _, c, h, w = seen["shape"]
    return h * w, c


def _kept_steps(captured_steps: Sequence[int] | None, steps: int) -> list[int]:
    """Sorted captured step indices (all when None); ValueError if empty or out of range."""
    kept = list(range(steps)) if captured_steps is None else sorted(set(captured_steps))
    if not kept or not 0 <= kept[0] <= kept[-1] < steps:
        raise ValueError(f"captured steps {kept} must be non-empty step indices in "
                         f"0..{steps - 1}")
    return kept


class _StepBuffer:
    """Records the hook block's cond half at the captured steps of one call, as
    [B, S, tokens, d] fp16 (a :data:`~steering.recording.BlockFn`)."""

    def __init__(self, slot: dict[int, int], cfg: bool) -> None:
        self.slot, self.cfg = slot, cfg
        self.data: Tensor | None = None
        self.filled = 0

    def __call__(self, step: int, timestep: int, row: int | None, x: Tensor) -> None:
        j = self.slot.get(step)
        if j is None:
            return
        x = cond_half(x, self.cfg).flatten(2).transpose(1, 2)  # [B, H·W, C]
        if self.data is None:
            self.data = torch.empty(x.shape[0], len(self.slot), *x.shape[1:],
                                    dtype=torch.float16, device=x.device)
        self.data[:, j].copy_(x)
        self.filled += 1


def capture_activations(pipe: Any, prompts: Sequence[PromptRecord], steps: int, guidance: float,
                        height: int, width: int, captured_steps: Sequence[int] | None,
                        batch_size: int, *, hook_point: str = HOOK_POINT
                        ) -> Iterator[tuple[PromptRecord, Tensor]]:
    """Run the DDIM pipeline over ``prompts`` (``batch_size`` per call, one CPU generator per
    prompt seeded with its seed) and yield per prompt its cond-half activations at
    ``hook_point``: CPU float16 [len(captured_steps) · tokens, d_in] in (step, token) order."""
    ensure_ddim(pipe)
    pipe.set_progress_bar_config(disable=True)
    kept = _kept_steps(captured_steps, steps)
    slot = {s: j for j, s in enumerate(kept)}
    last = kept[-1]
    cfg = guidance > 1.0
    block = pipe.unet.get_submodule(hook_point)

    def stop_after_last(p: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if step >= last:
            p._interrupt = True  # the remaining steps are skipped (diffusers' interrupt)
        return kwargs

    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        buffer = _StepBuffer(slot, cfg)
        negatives = [p.negative_prompt for p in batch]
        with recording(pipe.unet, {block: buffer}):
            pipe(prompt=[p.prompt for p in batch],
                 negative_prompt=negatives if any(negatives) else None,
                 num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                 generator=[torch.Generator().manual_seed(p.seed) for p in batch],
                 output_type="latent",
                 callback_on_step_end=stop_after_last if last < steps - 1 else None)
        if buffer.filled != len(kept):
            raise CollectError(f"{hook_point!r} ran at {buffer.filled} of the {len(kept)} "
                               "captured steps; is this a StableDiffusionPipeline?")
        assert buffer.data is not None
        acts = buffer.data.cpu()
        for i, record in enumerate(batch):
            yield record, acts[i].reshape(-1, acts.shape[-1])


def plan_store(pipe: Any, records: Sequence[PromptRecord], prompts_sha256: str, steps: int,
               guidance: float, height: int, width: int, captured_steps: Sequence[int] | None,
               prompts_per_shard: int, command: str, hook_point: str = HOOK_POINT
               ) -> StoreManifest:
    """The manifest of the store these settings produce (one short probe of the UNet)."""
    ensure_ddim(pipe)
    timesteps = schedule_timesteps(pipe, steps)
    kept = _kept_steps(captured_steps, steps)
    tokens, d_in = probe_hook_point(pipe, height, width, hook_point)
    return StoreManifest(
        format_version=FORMAT_VERSION, d_in=d_in, dtype="float16", hook_point=hook_point,
        pipeline_fingerprint=pipeline_fingerprint(pipe.unet, hook_point),
        scheduler=scheduler_description(pipe.scheduler), num_inference_steps=steps,
        guidance_scale=float(guidance), height=height, width=width, tokens_per_step=tokens,
        timesteps=timesteps, captured_steps=kept, prompts_sha256=prompts_sha256,
        num_prompts=len(records), prompts_per_shard=prompts_per_shard,
        num_shards=-(-len(records) // prompts_per_shard), command=command)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_once(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds it; False when it holds other
    bytes. Temp names carry the pid, so processes sharing a store never collide."""
    if not path.exists():
        try:
            atomic_write(path, data, path.with_name(f"{path.name}.{os.getpid()}{PARTIAL}"))
        except FileNotFoundError:  # another process cleaned our temp file up: it wrote one
            if not path.exists():
                raise
    return path.read_bytes() == data


def _clean_stale_partials(directory: Path) -> None:
    """Delete top-level temp files (name.PID.partial) whose process is gone."""
    for p in directory.glob(f"*{PARTIAL}"):
        pid = p.name[: -len(PARTIAL)].rsplit(".", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _settings_mismatch(out: Path, manifest: StoreManifest) -> CollectError:
    try:
        fields = manifest.diff(read_manifest(out))
    except StoreError:
        fields = ["(unreadable)"]
    return CollectError(
        f"{out / MANIFEST} was written with other settings (differs in: "
        f"{', '.join(fields)}); collect into another --out, or delete {out} to start over")


def check_store_dir(out: Path, manifest: StoreManifest, prompts_bytes: bytes) -> None:
    """An existing store folder must have been made with the same settings and prompts
    (CollectError naming the fields that differ); an absent one passes."""
    path = out / MANIFEST
    if path.exists() and path.read_bytes() != manifest.to_json().encode():
        raise _settings_mismatch(out, manifest)
    if (out / PROMPTS).exists() and (out / PROMPTS).read_bytes() != prompts_bytes:
        raise CollectError(f"{out / PROMPTS} differs from the prompt file although store.json "
                           f"matches; delete {out} and collect again")


def create_store_dir(out: Path, manifest: StoreManifest, prompts_bytes: bytes) -> None:
    """Create the store folder with store.json and prompts.jsonl (atomic, safe when several
    --shard processes start at once)."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    if not _write_once(out / MANIFEST, manifest.to_json().encode()):
        raise _settings_mismatch(out, manifest)
    if not _write_once(out / PROMPTS, prompts_bytes):
        check_store_dir(out, manifest, prompts_bytes)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _shards_to_do(out: Path, manifest: StoreManifest, mine: Sequence[int], verify: bool,
                  log: Any) -> list[int]:
    """Clean up ``mine`` and return the shards still to write (missing, partial or bad)."""
    todo = []
    for s in mine:
        npy, js = shard_paths(out, s)
        partial_path(npy).unlink(missing_ok=True)
        partial_path(js).unlink(missing_ok=True)
        if js.exists():
            problem = shard_problem(out, manifest, s, verify=verify)
            if problem is None:
                continue
            log(f"collect: redoing a bad shard: {problem}")
        remove_shard(out, s)  # also an .npy renamed before its .json was written
        todo.append(s)
    return todo


class _Writer(threading.Thread):
    """Consumes (shard, prompt id, rows) items; commits a shard after its last prompt."""

    def __init__(self, out: Path, manifest: StoreManifest, maxsize: int, bar: tqdm) -> None:
        super().__init__(name="activation-writer", daemon=True)
        self.out, self.manifest, self.bar = out, manifest, bar
        self.queue: queue.Queue[tuple[int, int, Tensor] | None] = queue.Queue(maxsize)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def put(self, item: tuple[int, int, Tensor]) -> None:
        """Queue an item (blocks while the queue is full); raises the writer's error."""
        while self.error is None:
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise self.error

    def finish(self, abort: bool = False) -> None:
        """Let the writer drain the queue (or abort the shard in progress) and join it."""
        if abort:
            self.stop.set()
            while True:
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self.join()
        if self.error is not None and not abort:
            raise self.error

    def run(self) -> None:
        writer: ShardWriter | None = None
        try:
            while (item := self.queue.get()) is not None and not self.stop.is_set():
                shard, pid, rows = item
                if writer is None:
                    writer = ShardWriter(self.out, self.manifest, shard)
                writer.write_prompt(pid, rows.numpy())
                self.bar.update(rows.shape[0])
                if pid == writer.prompt_ids[-1]:
                    writer.commit()
                    writer = None
        except BaseException as e:
            self.error = self._explain(e, writer)
        finally:
            if writer is not None:
                writer.abort()
                remove_shard(self.out, writer.shard)

    def _explain(self, e: BaseException, writer: ShardWriter | None) -> BaseException:
        if not isinstance(e, OSError) or writer is None:
            return e
        name = f"shards/{writer.npy.name}"
        if e.errno == errno.ENOSPC:
            free = shutil.disk_usage(self.out).free
            err = CollectError(
                f"no space left on the device while writing {name} in {self.out} "
                f"({_human(free)} free); the partial shard was removed. Free some space or "
                "move the store, then rerun `steer collect` with the same arguments: "
                "committed shards are kept")
        else:
            err = CollectError(f"writing {name} in {self.out} failed ({e}); the partial shard "
                               "was removed; rerun `steer collect` to redo it")
        err.__cause__ = e
        return err


def collect(pipe: Any, prompts_path: str | Path, out_dir: str | Path, steps: int = 50,
            guidance: float = 7.5, height: int | None = None, width: int | None = None,
            captured_steps: Sequence[int] | None = None, shard: tuple[int, int] = (0, 1),
            prompts_per_shard: int = 64, batch_size: int = 8, command: str = "",
            progress: bool = True, *, force: bool = False, verify: bool = False,
            queue_prompts: int | None = None, hook_point: str = HOOK_POINT
            ) -> ActivationStore:
    """Collect (or resume) this process's shards s (s % n == i for ``shard=(i, n)``) of the
    store in ``out_dir`` and return the store as it now stands."""
    index, count = shard
    if not 0 <= index < count:
        raise CollectError(f"shard {index}/{count}: need 0 <= i < n")
    if prompts_per_shard < 1 or batch_size < 1:
        raise CollectError("prompts_per_shard and batch_size must be >= 1")
    prompts_path, out = Path(prompts_path), Path(out_dir)
    prompts_bytes = prompts_path.read_bytes()
    records = parse_prompts(prompts_bytes.decode("utf-8"), str(prompts_path))
    size = pipeline_default_size(pipe)
    height, width = height or size, width or size
    manifest = plan_store(pipe, records, hashlib.sha256(prompts_bytes).hexdigest(), steps,
                          guidance, height, width, captured_steps, prompts_per_shard, command,
                          hook_point)
    check_store_dir(out, manifest, prompts_bytes)

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg, file=sys.stderr)

    mine = [s for s in range(manifest.num_shards) if s % count == index]
    todo = _shards_to_do(out, manifest, mine, verify, log) if (out / "shards").is_dir() else mine
    need = sum(manifest.shard_bytes(s) + _RECORD_BYTES * len(manifest.captured_steps)
               * len(manifest.shard_prompts(s)) for s in todo)
    free = shutil.disk_usage(_existing_parent(out)).free
    log(f"collect {index}/{count}: {len(todo)} of {len(mine)} shards to write, about "
        f"{_human(need)} ({_human(free)} free in {out})")
    if need > free and not force:
        raise CollectError(
            f"not enough disk space in {out}: the {len(todo)} shards still to write need about "
            f"{_human(need)} but {_human(free)} is free. Free some space, choose another --out, "
            "capture fewer steps (--capture-steps) or split the prompts over machines "
            "(--shard i/n); --force starts anyway")
    create_store_dir(out, manifest, prompts_bytes)
    rows = sum(manifest.shard_rows(s) for s in todo)
    with tqdm(total=rows, unit="tok", unit_scale=True, disable=not progress, smoothing=0.05,
              desc=f"collect {index}/{count}", file=sys.stderr) as bar:
        writer = _Writer(out, manifest, queue_prompts or 2 * batch_size, bar)
        writer.start()
        try:
            for s in todo:
                batch = [records[p] for p in manifest.shard_prompts(s)]
                for record, acts in capture_activations(
                        pipe, batch, steps, guidance, height, width, manifest.captured_steps,
                        batch_size, hook_point=hook_point):
                    writer.put((s, record.id, acts))
        except BaseException:
            writer.finish(abort=True)
            raise
        writer.finish()
    return ActivationStore.open(out)
