"""`steer collect` on the tiny pipeline: contents, resume after kill -9, torn and corrupt
shards, ENOSPC, --shard splits, the disk-space check and the command line."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from training.activations import collect as collect_mod
from training.activations.cli import register
from training.activations.collect import (
    CollectError,
    capture_activations,
    collect,
    parse_steps,
)
from training.activations.prompts import PromptRecord, load_prompts, write_prompts
from training.activations.store import ActivationStore, ShardWriter, StoreError, shard_paths

REPO = Path(__file__).resolve().parents[2]
# 8 prompts, 2 per shard (4 shards), 2 per pipeline call, 3 steps of which 2 are kept.
SETTINGS = dict(steps=3, guidance=4.0, height=32, width=32, captured_steps=[0, 2],
                prompts_per_shard=2, batch_size=2, command="test")
N_PROMPTS = 8


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    colours, shapes = ["red", "green", "blue"], ["circle", "square"]
    write_prompts(path, [
        PromptRecord(i, f"a {colours[i % 3]} {shapes[i % 2]}",
                     {"colour": colours[i % 3], "shape": shapes[i % 2]}, seed=100 + i,
                     negative_prompt="blurry" if i == 5 else "")
        for i in range(N_PROMPTS)])
    return path


@pytest.fixture(scope="module")
def reference(pipe, prompts_file, tmp_path_factory):
    """An uninterrupted single-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "store"
    collect(pipe, prompts_file, out, progress=False, **SETTINGS)
    return out


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []


def test_store_contents(reference, pipe, prompts_file):
    store = ActivationStore.open(reference)
    store.verify()
    m = store.manifest
    assert store.complete and store.shard_ids() == [0, 1, 2, 3]
    assert (m.d_in, m.tokens_per_step, m.num_shards, m.captured_steps) == (64, 64, 4, [0, 2])
    assert len(m.timesteps) == 3 and m.scheduler["class_name"] == "DDIMScheduler"
    assert store.num_rows == N_PROMPTS * 2 * 64
    assert (reference / "prompts.jsonl").read_bytes() == prompts_file.read_bytes()
    recs = store.records()
    assert [(r.prompt_id, r.step, r.timestep) for r in recs[:2]] == [
        (0, 0, m.timesteps[0]), (0, 2, m.timesteps[2])]
    # Prompt 5 generated alone (batch of 1, its own seed) gives the rows stored for it.
    prompt = load_prompts(prompts_file)[5]
    (_, alone), = capture_activations(pipe, [prompt], 3, 4.0, 32, 32, [0, 2], batch_size=1)
    rows = [r for r in recs if r.prompt_id == 5]
    stored = np.concatenate([store.shard_array(r.shard)[r.row_start:r.row_end] for r in rows])
    assert alone.dtype == torch.float16 and alone.shape == stored.shape
    np.testing.assert_allclose(alone.float().numpy(), stored.astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    assert np.abs(stored).max() > 0


def test_captured_rows_are_the_cond_half_at_the_hook(pipe, prompts_file):
    """The rows equal the hooked block's cond-half output, taken with a plain torch hook."""
    prompt = load_prompts(prompts_file)[1]
    seen = []
    block = pipe.unet.get_submodule("up_blocks.1.attentions.1")
    handle = block.register_forward_hook(
        lambda m, a, out: seen.append(out[0].chunk(2)[1].flatten(2).transpose(1, 2)))
    try:
        pipe(prompt=prompt.prompt, num_inference_steps=3, guidance_scale=4.0, height=32,
             width=32, generator=torch.Generator().manual_seed(prompt.seed), output_type="latent")
    finally:
        handle.remove()
    (_, got), = capture_activations(pipe, [prompt], 3, 4.0, 32, 32, [0, 2], batch_size=1)
    assert torch.equal(got, torch.cat([seen[0][0], seen[2][0]]).half())
    # Steps after the last captured one are skipped (diffusers' interrupt); same rows.
    (_, first), = capture_activations(pipe, [prompt], 3, 4.0, 32, 32, [1, 0], batch_size=1)
    assert torch.equal(first, torch.cat([seen[0][0], seen[1][0]]).half())
    with pytest.raises(ValueError, match="captured steps"):
        next(capture_activations(pipe, [prompt], 3, 4.0, 32, 32, [3], batch_size=1))


DRIVER = """
import sys, time
from diffusers import StableDiffusionPipeline
from training.activations import store
from training.activations.collect import collect

write = store.ShardWriter.write_prompt
def slow(self, *args):
    write(self, *args)
    time.sleep(0.2)  # give the test time to kill us mid-collection
store.ShardWriter.write_prompt = slow
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
collect(pipe, sys.argv[2], sys.argv[3], progress=False, **{settings})
"""


def test_resume_after_kill_9_is_byte_identical(reference, pipe, prompts_file,
                                               tiny_pipeline_dir, tmp_path):
    out = tmp_path / "store"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.replace("{settings}", repr(SETTINGS)))
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_pipeline_dir),
                             str(prompts_file), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # Kill mid-shard: shard 0 committed, shard 1's rows streaming into its .partial.
        partial = out / "shards" / "00001.npy.partial"
        while not (shard_paths(out, 0)[1].exists() and partial.exists()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard committed within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and partial.exists()
    interrupted = ActivationStore.open(out)
    assert 0 in interrupted.shard_ids() and not interrupted.complete
    collect(pipe, prompts_file, out, progress=False, **SETTINGS)
    assert_identical(out, reference)


def test_truncated_shard_named_then_redone(reference, pipe, prompts_file, tmp_path,
                                           monkeypatch):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    npy = shard_paths(out, 2)[0]
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 100)
    with pytest.raises(StoreError, match=r"shards/00002\.npy is truncated"):
        ActivationStore.open(out)
    written = []
    init = ShardWriter.__init__
    monkeypatch.setattr(ShardWriter, "__init__",
                        lambda self, d, m, s: (written.append(s), init(self, d, m, s))[1])
    collect(pipe, prompts_file, out, progress=False, **SETTINGS)
    assert written == [2]
    assert_identical(out, reference)


def test_corrupt_shard_found_by_verify_and_redone(reference, pipe, prompts_file, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    npy = shard_paths(out, 1)[0]
    data = bytearray(npy.read_bytes())
    data[-7] ^= 0x55
    npy.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shards/00001\.npy is corrupt"):
        ActivationStore.open(out).verify()
    collect(pipe, prompts_file, out, progress=False, verify=True, **SETTINGS)
    assert_identical(out, reference)


def test_out_of_space_is_clear_and_indexes_nothing_unwritten(pipe, prompts_file, tmp_path,
                                                             monkeypatch):
    out = tmp_path / "store"
    write = ShardWriter._write

    def full_disk(self, data):
        if self.shard == 1 and self._written > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(ShardWriter, "_write", full_disk)
    with pytest.raises(CollectError, match=r"no space left .* writing shards/00001\.npy .* "
                       r"free\)"):
        collect(pipe, prompts_file, out, progress=False, **SETTINGS)
    assert not shard_paths(out, 1)[1].exists() and not shard_paths(out, 1)[0].exists()
    assert not list(out.rglob("*.partial"))
    store = ActivationStore.open(out)
    assert store.shard_ids() == [0]
    assert {r.prompt_id for r in store.records()} == {0, 1}


def test_two_shard_processes_equal_one_run(reference, pipe, prompts_file, tmp_path):
    out = tmp_path / "store"
    first = collect(pipe, prompts_file, out, shard=(1, 2), progress=False, **SETTINGS)
    assert first.shard_ids() == [1, 3] and not first.complete
    second = collect(pipe, prompts_file, out, shard=(0, 2), progress=False, **SETTINGS)
    assert second.complete
    assert_identical(out, reference)


def test_refuses_when_disk_is_too_small(pipe, prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "store"
    monkeypatch.setattr(collect_mod.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CollectError, match=r"not enough disk space .* --force"):
        collect(pipe, prompts_file, out, progress=False, **SETTINGS)
    assert not out.exists()
    forced = collect(pipe, prompts_file, out, progress=False, force=True,
                     **{**SETTINGS, "prompts_per_shard": 8})
    assert forced.complete


def test_other_settings_in_the_same_folder_are_refused(reference, pipe, prompts_file,
                                                       tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    with pytest.raises(CollectError, match=r"differs in: guidance_scale"):
        collect(pipe, prompts_file, out, progress=False, **{**SETTINGS, "guidance": 5.0})


def test_parse_steps():
    assert parse_steps("all", 10) is None
    assert parse_steps("0,5,9", 10) == [0, 5, 9]
    assert parse_steps("0:10:4,9", 10) == [0, 4, 8, 9]
    for bad in ("10", "a", "1:2:3:4"):
        with pytest.raises(ValueError, match="capture steps"):
            parse_steps(bad, 10)


def test_cli_collect(tiny_pipeline_dir, prompts_file, tmp_path):
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None: ...

    out = tmp_path / "store"
    args = ["collect", "--pipeline", str(tiny_pipeline_dir), "--prompts", str(prompts_file),
            "--out", str(out), "--steps", "2", "--guidance", "3", "--capture-steps", "1",
            "--prompts-per-shard", "4", "--batch-size", "4"]
    half = CliRunner().invoke(app, [*args, "--shard", "1/2"])
    assert half.exit_code == 0, half.output
    assert "1 of 2 shards" in half.output
    full = CliRunner().invoke(app, args)
    assert full.exit_code == 0, full.output
    m = json.loads((out / "store.json").read_text())
    assert m["command"] == ("steer collect --pipeline pipe --prompts prompts.jsonl --steps 2 "
                           "--guidance 3 --size 32 --capture-steps 1 --prompts-per-shard 4 "
                           "--batch-size 4 --dtype float32")
    assert m["captured_steps"] == [1] and ActivationStore.open(out).complete
    bad = CliRunner().invoke(app, [*args, "--guidance", "5"])
    assert bad.exit_code == 1 and "differs in: guidance_scale" in bad.output
    bad = CliRunner().invoke(app, [*args, "--capture-steps", "7"])
    assert bad.exit_code == 2 and "0..1" in bad.output
