"""The on-disk activation store written by `steer collect`: format, reader and shard writer.

    store.json          StoreManifest, written first, identical on every run and process
    prompts.jsonl       byte copy of the prompt file
    shards/00000.npy    float16 [rows, d_in], a plain .npy (np.load(mmap_mode="r") works)
    shards/00000.json   commit record, written (fsync + rename) after the .npy is fsynced and
                        renamed: {"shard", "rows", "sha256", "prompt_ids", "records"}
    *.partial           in-progress files: never read, deleted and redone on resume

Shard s holds prompts [s*P, min((s+1)*P, N)); rows are ordered prompt, captured step, token.
A shard counts once its .json exists and its .npy has the size its header states (and the
sha256 matches, when verified). Nothing holds a timestamp, so a resumed run is byte-identical
to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from steering.bundle import sha256_file
from training.activations.prompts import PromptRecord, load_prompts

FORMAT_VERSION = 1
MANIFEST = "store.json"
PROMPTS = "prompts.jsonl"
SHARDS = "shards"
PARTIAL = ".partial"
DTYPE = np.dtype("<f2")


class StoreError(RuntimeError):
    """A store or shard that cannot be used; the message names the file and what to do."""


@dataclass
class StoreManifest:
    """Contents of store.json: what was collected, how, and how it is split into shards."""

    format_version: int
    d_in: int
    dtype: str
    hook_point: str
    pipeline_fingerprint: str
    scheduler: dict[str, Any]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    tokens_per_step: int
    timesteps: list[int]
    captured_steps: list[int]
    prompts_sha256: str
    num_prompts: int
    prompts_per_shard: int
    num_shards: int
    command: str

    def to_json(self) -> str:
        """Canonical text of store.json (sorted keys, no timestamps)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreManifest:
        """Parse store.json's object; KeyError/TypeError on a missing or wrong field."""
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise KeyError(f"missing field(s) {sorted(missing)}")
        return cls(**{k: d[k] for k in names})

    @property
    def rows_per_prompt(self) -> int:
        """Rows each prompt contributes: captured steps × tokens per step."""
        return len(self.captured_steps) * self.tokens_per_step

    def shard_prompts(self, shard: int) -> range:
        """Prompt ids held by ``shard``."""
        start = shard * self.prompts_per_shard
        return range(start, min(start + self.prompts_per_shard, self.num_prompts))

    def shard_rows(self, shard: int) -> int:
        """Rows of ``shard`` once complete."""
        return len(self.shard_prompts(shard)) * self.rows_per_prompt

    def shard_bytes(self, shard: int) -> int:
        """Size of the shard's .npy file."""
        return len(npy_header(self.shard_rows(shard), self.d_in)) + \
            self.shard_rows(shard) * self.d_in * DTYPE.itemsize

    def diff(self, other: StoreManifest) -> list[str]:
        """Names of the fields whose values differ."""
        a, b = asdict(self), asdict(other)
        return [k for k in a if a[k] != b[k]]


@dataclass(frozen=True)
class IndexRecord:
    """Rows [row_start, row_end) of ``shard`` hold prompt ``prompt_id`` at denoising ``step``."""

    prompt_id: int
    step: int
    timestep: int
    shard: int
    row_start: int
    row_end: int


def shard_name(shard: int) -> str:
    """The file stem of a shard: 00042."""
    return f"{shard:05d}"


def shard_paths(directory: Path, shard: int) -> tuple[Path, Path]:
    """(.npy, .json) paths of ``shard`` in a store folder."""
    base = Path(directory) / SHARDS / shard_name(shard)
    return base.with_suffix(".npy"), base.with_suffix(".json")


def partial_path(path: Path) -> Path:
    """The in-progress name of ``path``."""
    return path.with_name(path.name + PARTIAL)


def npy_header(rows: int, d_in: int) -> bytes:
    """The .npy (v1.0) header of a C-order float16 [rows, d_in] array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
              "shape": (rows, d_in)})
    return buf.getvalue()


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, temp: Path | None = None) -> None:
    """Write ``data`` to ``temp`` (default path.partial), fsync, rename over ``path``."""
    temp = temp or partial_path(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def commit_text(commit: dict[str, Any]) -> str:
    """Canonical text of a shard's commit record."""
    return json.dumps(commit, sort_keys=True, separators=(",", ":")) + "\n"


def _rel(directory: Path, path: Path) -> str:
    try:
        return str(path.relative_to(directory))
    except ValueError:
        return str(path)


def read_commit(directory: Path, manifest: StoreManifest, shard: int) -> dict[str, Any]:
    """The shard's commit record, checked against the manifest; ValueError says what is wrong."""
    js = shard_paths(directory, shard)[1]
    try:
        commit = json.loads(js.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_rel(directory, js)} is unreadable ({e})") from e
    want_ids = list(manifest.shard_prompts(shard))
    rows = manifest.shard_rows(shard)
    if not isinstance(commit, dict) or commit.get("shard") != shard or \
            commit.get("rows") != rows or commit.get("prompt_ids") != want_ids or \
            not isinstance(commit.get("sha256"), str) or \
            len(commit.get("records", ())) != len(want_ids) * len(manifest.captured_steps):
        raise ValueError(f"{_rel(directory, js)} does not match store.json (expected shard "
                         f"{shard}, {rows} rows, prompts {want_ids[0]}..{want_ids[-1]})")
    return commit


def shard_problem(directory: str | Path, manifest: StoreManifest, shard: int,
                  verify: bool = False) -> str | None:
    """What is wrong with a committed shard (None when sound). Checks the commit record, the
    .npy header and the file size; with ``verify`` also the sha256."""
    directory = Path(directory)
    npy, _ = shard_paths(directory, shard)
    try:
        commit = read_commit(directory, manifest, shard)
    except ValueError as e:
        return str(e)
    name = _rel(directory, npy)
    try:
        size = npy.stat().st_size
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            data_at = f.tell()
    except FileNotFoundError:
        return f"{name} is missing but its .json commit record exists"
    except (OSError, ValueError) as e:
        return f"{name} has no valid .npy header ({e})"
    if fortran or dtype != DTYPE or shape != (commit["rows"], manifest.d_in):
        return (f"{name} holds {dtype} {list(shape)}, expected float16 "
                f"[{commit['rows']}, {manifest.d_in}]")
    want = data_at + commit["rows"] * manifest.d_in * DTYPE.itemsize
    if size != want:
        what = "truncated" if size < want else "longer than its header states"
        return f"{name} is {what}: {size} of {want} bytes"
    if verify and sha256_file(npy) != commit["sha256"]:
        return f"{name} is corrupt: its sha256 differs from the one in its .json commit record"
    return None


def redo_advice(problem: str) -> str:
    """A shard problem plus what to do about it."""
    return (f"{problem}; delete the shard's .npy and .json and rerun `steer collect` with the "
            "same arguments to redo it")


def read_manifest(directory: str | Path) -> StoreManifest:
    """store.json of a store folder; StoreError naming it when missing or malformed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{directory} is not an activation store (no {MANIFEST}); create one "
                         "with `steer collect --out DIR`")
    try:
        manifest = StoreManifest.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is malformed ({e}); delete the store and rerun "
                         "`steer collect`") from e
    if manifest.format_version != FORMAT_VERSION:
        raise StoreError(f"{path} has format version {manifest.format_version}, this code "
                         f"reads {FORMAT_VERSION}; recollect with this version")
    return manifest


class ActivationStore:
    """Read-only view of the committed shards of a store folder."""

    def __init__(self, directory: Path, manifest: StoreManifest,
                 commits: dict[int, dict[str, Any]]) -> None:
        self.directory, self.manifest, self._commits = directory, manifest, commits

    @classmethod
    def open(cls, directory: str | Path) -> ActivationStore:
        """Open a store; every committed shard's size is checked (StoreError naming a bad one)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        commits: dict[int, dict[str, Any]] = {}
        for shard in committed_shards(directory, manifest):
            problem = shard_problem(directory, manifest, shard)
            if problem is not None:
                raise StoreError(f"store {directory}: " + redo_advice(problem))
            commits[shard] = read_commit(directory, manifest, shard)
        return cls(directory, manifest, commits)

    def prompts(self) -> list[PromptRecord]:
        """The store's prompt records (ids are line numbers of prompts.jsonl)."""
        return load_prompts(self.directory / PROMPTS)

    def shard_ids(self) -> list[int]:
        """Committed shards, ascending."""
        return sorted(self._commits)

    def shard_rows(self, shard: int) -> int:
        """Rows of a committed shard."""
        return int(self._commit(shard)["rows"])

    def shard_array(self, shard: int) -> np.ndarray:
        """Read-only memory map float16 [rows, d_in] of a committed shard."""
        self._commit(shard)
        return np.load(shard_paths(self.directory, shard)[0], mmap_mode="r")

    def records(self) -> list[IndexRecord]:
        """Index of all committed rows, sorted by (shard, row_start)."""
        out = []
        for shard in self.shard_ids():
            out += [IndexRecord(p, s, t, shard, a, b)
                    for p, s, t, a, b in self._commits[shard]["records"]]
        return sorted(out, key=lambda r: (r.shard, r.row_start))

    @property
    def num_rows(self) -> int:
        """Rows over all committed shards."""
        return sum(int(c["rows"]) for c in self._commits.values())

    @property
    def complete(self) -> bool:
        """Whether every shard 0..num_shards-1 is committed."""
        return len(self._commits) == self.manifest.num_shards

    def verify(self) -> None:
        """Check the sha256 of every committed shard; StoreError naming the first bad one."""
        for shard in self.shard_ids():
            problem = shard_problem(self.directory, self.manifest, shard, verify=True)
            if problem is not None:
                raise StoreError(f"store {self.directory}: " + redo_advice(problem))

    def _commit(self, shard: int) -> dict[str, Any]:
        if shard not in self._commits:
            raise StoreError(f"shard {shard_name(shard)} of {self.directory} is not committed "
                             f"(committed: {len(self._commits)} of {self.manifest.num_shards}); "
                             "rerun `steer collect` to finish the store")
        return self._commits[shard]


def committed_shards(directory: Path, manifest: StoreManifest) -> list[int]:
    """Shards whose .json commit record exists (not checked), ascending."""
    return [s for s in range(manifest.num_shards) if shard_paths(directory, s)[1].is_file()]


class ShardWriter:
    """Streams one shard: .npy header then each prompt's rows into shards/NNNNN.npy.partial;
    :meth:`commit` fsyncs and renames it, then writes the .json commit record atomically."""

    def __init__(self, directory: str | Path, manifest: StoreManifest, shard: int) -> None:
        self.directory, self.manifest, self.shard = Path(directory), manifest, shard
        self.npy, self.json = shard_paths(self.directory, shard)
        self.partial = partial_path(self.npy)
        self.prompt_ids = list(manifest.shard_prompts(shard))
        self.rows = manifest.shard_rows(shard)
        self._sha = hashlib.sha256()
        self._written = 0
        self._next = 0
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._file: io.BufferedWriter | None = open(self.partial, "wb")  # noqa: SIM115
        self._write(npy_header(self.rows, manifest.d_in))

    def _write(self, data: bytes | memoryview) -> None:
        assert self._file is not None
        self._file.write(data)
        self._sha.update(data)

    def write_prompt(self, prompt_id: int, rows: np.ndarray) -> None:
        """Append one prompt's rows [rows_per_prompt, d_in] (prompts in shard order)."""
        want = self.prompt_ids[self._next] if self._next < len(self.prompt_ids) else None
        if prompt_id != want:
            raise ValueError(f"shard {self.shard} expects prompt {want}, got {prompt_id}")
        shape = (self.manifest.rows_per_prompt, self.manifest.d_in)
        if rows.shape != shape:
            raise ValueError(f"prompt {prompt_id}: got rows {rows.shape}, expected {shape}")
        data = np.ascontiguousarray(rows, dtype=DTYPE)
        self._write(memoryview(data.reshape(-1).view(np.uint8)))
        self._written += shape[0]
        self._next += 1

    def commit(self) -> None:
        """Make the shard durable and visible: fsync + rename the .npy, then the .json."""
        if self._written != self.rows:
            raise ValueError(f"shard {self.shard}: {self._written} of {self.rows} rows written")
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.partial, self.npy)
        fsync_dir(self.npy.parent)
        atomic_write(self.json, commit_text(self.commit_record()).encode())

    def commit_record(self) -> dict[str, Any]:
        """The .json commit record of the finished shard."""
        m, t = self.manifest, self.manifest.tokens_per_step
        records, row = [], 0
        for pid in self.prompt_ids:
            for step in m.captured_steps:
                records.append([pid, step, m.timesteps[step], row, row + t])
                row += t
        return {"shard": self.shard, "rows": self.rows, "sha256": self._sha.hexdigest(),
                "prompt_ids": self.prompt_ids, "records": records}

    def abort(self) -> None:
        """Close and delete the partial file (nothing is committed)."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # e.g. ENOSPC on the final flush
                self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)


def remove_shard(directory: str | Path, shard: int) -> None:
    """Uncommit and delete a shard: the .json first, so it never points at a missing .npy."""
    npy, js = shard_paths(Path(directory), shard)
    for path in (js, partial_path(js), npy, partial_path(npy)):
        path.unlink(missing_ok=True)

