"""The content policy through the service: GET /v1/policy, the per-key override, jobs carrying
the caller's policy to the worker (run in this process) and the views of a refused, a steered
and a flagged generation; gateway, worker and `steer keys` refuse bad policy set-ups."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from rq import Queue
from typer.testing import CliRunner

from service import auth, runner
from service.catalog import load_catalog
from service.cli_keys import keys_app
from service.jobstore import enqueue_generation, new_id
from service.policy import PolicyError
from service.settings import REPO_ASSETS
from tests.service.api_support import api_client
from tests.service.conftest import fast_settings, settings_env
from tests.service.worker_support import ROOT, record, run_queued

TOY_POLICY = ROOT / "policies" / "toy.toml"
# Held-out seeds whose detection scores are far from the toy policy's thresholds (measured).
CROSS = {"prompt": "a green cross on a plain background", "seed": 1_200_234, "steps": 20,
         "guidance": 4.0}
STRIPED = {"prompt": "a blue square on a striped background", "seed": 1_200_114, "steps": 20,
           "guidance": 4.0}
DOTTED = {"prompt": "a yellow square on a dotted background", "seed": 1_200_138, "steps": 20,
          "guidance": 4.0}


@pytest.fixture
def guarded(tmp_path, redis_url):
    """Settings with API keys on and the toy policy file."""
    return fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                         policy_file=TOY_POLICY)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_get_policy_without_a_policy_file_is_none(settings):
    with api_client(settings) as c:
        r = c.get("/v1/policy")
    assert r.status_code == 200
    assert r.json() == {"name": None, "source": "none", "description": "", "suppress": [],
                        "detect": []}


def test_get_policy_is_the_default_unless_the_key_names_another(guarded, conn):
    _, plain = auth.create_key(conn, "alice")
    _, trusted = auth.create_key(conn, "ops", policy="trusted")
    key, ghost = auth.create_key(conn, "old", policy="retired")
    with api_client(guarded) as c:
        assert c.get("/v1/policy").status_code == 401
        public = c.get("/v1/policy", headers=bearer(plain)).json()
        assert (public["name"], public["source"]) == ("public", "default")
        red_pct = load_catalog(REPO_ASSETS / "toy-bundle").concepts["red"].default_percentile
        assert public["suppress"] == [{"concept": "red", "direction": "suppress",
                                       "gamma": 2.0, "percentile": red_pct}]  # policies/toy.toml
        assert public["detect"][0] == {"concept": "cross", "threshold": 0.5,
                                       "action": "refuse"}
        mine = c.get("/v1/policy", headers=bearer(trusted)).json()
        assert (mine["name"], mine["source"], mine["suppress"]) == ("trusted", "api_key", [])
        broken = c.get("/v1/policy", headers=bearer(ghost))
        assert broken.status_code == 500
        assert key.id in broken.json()["detail"] and "retired" in broken.json()["detail"]
        # ... and such a key cannot submit: nothing would say which policy applies.
        assert c.post("/v1/generations", json=CROSS, headers=bearer(ghost)).status_code == 500


def test_the_callers_policy_is_applied_refused_steered_and_flagged(guarded, conn):
    _, plain = auth.create_key(conn, "alice")
    _, trusted = auth.create_key(conn, "ops", policy="trusted")
    runner.configure(guarded)
    with api_client(guarded) as c:
        def submit(body, token):
            r = c.post("/v1/generations", json=body, headers=bearer(token))
            assert r.status_code == 202, r.text
            return r.json()["id"]

        ids = {"refused": submit(CROSS, plain), "trusted": submit(CROSS, trusted),
               "steered": submit({**STRIPED, "concepts": [
                   {"name": "red", "direction": "amplify", "gamma": 3}]}, plain),
               "flagged": submit(DOTTED, plain)}
        assert {Queue(guarded.queue_name, connection=conn).fetch_job(i).meta["policy"]
                for i in ids.values()} == {"public", "trusted"}
        run_queued(conn, guarded)
        views = {k: c.get(f"/v1/generations/{i}", headers=bearer(
            trusted if k == "trusted" else plain)).json() for k, i in ids.items()}

    refused = views["refused"]
    assert refused["status"] == "failed" and refused["images"] == []
    assert refused["error_code"] == "content_policy_violation"
    assert refused["error"].startswith("refused by content policy 'public': detected 'cross' "
                                       "in image 0 (seed 1200234, score ")
    policy = refused["policy"]
    assert policy["name"] == "public" and policy["refused"]
    (image,) = policy["images"]
    cross = image["checks"][0]
    assert (cross["concept"], cross["rule"], cross["action"]) == ("cross", "refuse", "refuse")
    assert cross["score"] >= cross["threshold"] == 0.5

    trusted_view = views["trusted"]
    assert trusted_view["status"] == "succeeded" and len(trusted_view["images"]) == 1
    assert trusted_view["policy"]["name"] == "trusted"
    assert trusted_view["policy"]["images"][0]["flagged"]
    assert trusted_view["parameters"]["concepts"] == []  # trusted: nothing suppressed
    assert trusted_view["error_code"] is None

    steered = views["steered"]
    assert steered["status"] == "succeeded", steered["error"]
    # The policy's red suppression replaced the request's amplification of red ...
    red_pct = load_catalog(REPO_ASSETS / "toy-bundle").concepts["red"].default_percentile
    assert steered["parameters"]["concepts"] == [
        {"name": "red", "direction": "suppress", "gamma": 2.0, "percentile": red_pct}]
    assert steered["policy"]["replaced"] == [
        {"concept": "red", "direction": "amplify", "gamma": 3.0, "percentile": red_pct}]
    # ... and the striped background was steered away: same seed, both scores reported.
    (image,) = steered["policy"]["images"]
    assert image["steered"] and not image["flagged"] and image["seed"] == 1_200_114
    striped = image["checks"][1]
    assert striped["action"] == "steer" and striped["steered_score"] is not None
    assert "score after" in striped["reason"]
    assert steered["detection_after"][0]["striped"] == striped["steered_score"]  # final image

    flagged = views["flagged"]
    assert flagged["status"] == "succeeded" and flagged["policy"]["images"][0]["flagged"]
    assert [c["action"] for c in flagged["policy"]["images"][0]["checks"]] == [
        "none", "none", "mark"]
    assert flagged["provenance"]["policy"]["name"] == "public"
    # The refused job wrote no image: one PNG each for the other three.
    assert len(list(guarded.images_dir.glob("*.png"))) == 3


def test_batch_jobs_carry_the_callers_policy_too(guarded, conn):
    _, trusted = auth.create_key(conn, "ops", policy="trusted")
    with api_client(guarded) as c:
        r = c.post("/v1/batches", json={"requests": [CROSS, DOTTED]}, headers=bearer(trusted))
    assert r.status_code == 202, r.text
    queue = Queue(guarded.queue_name, connection=conn)
    assert [queue.fetch_job(g["id"]).meta["policy"] for g in r.json()["generations"]] == [
        "trusted", "trusted"]


def test_a_worker_without_the_policy_file_fails_jobs_that_name_a_policy(settings, conn):
    runner.configure(settings)  # no policy file
    job_id = new_id()
    payload = {**CROSS, "steps": 2}
    enqueue_generation(Queue(settings.queue_name, connection=conn), payload, job_id=job_id,
                       owner=None, request_id=None, batch_id=None, webhook=None,
                       timeout_s=60, retention_s=600, policy="public")
    run_queued(conn, settings)
    rec = record(conn, settings, job_id)
    assert rec.status == "failed" and rec.error is not None
    assert "asks for content policy 'public', but this worker has no policy file" in rec.error


def test_gateway_and_worker_refuse_to_start_on_a_bad_policy_file(tmp_path, redis_url):
    bad = tmp_path / "policy.toml"
    bad.write_text('default = "public"\n[policies.public]\n'
                   'detect = [{ concept = "sword", threshold = 0.5, action = "refuse" }]\n')
    settings = fast_settings(tmp_path / "data", redis_url, policy_file=bad)
    expected = f"{bad}: policy 'public', detect[0] (concept 'sword'), field concept: not in"
    with pytest.raises(PolicyError, match=re.escape(expected)), api_client(settings):
        pass
    with pytest.raises(PolicyError, match="not in the bundle"):
        runner.configure(settings)
    env = {**settings_env(settings), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "service.cli_worker", "--burst"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert expected in proc.stderr


def test_keys_create_takes_a_policy_checked_against_the_file(redis_url, conn):
    cli = CliRunner()
    common = ["--redis-url", redis_url, "--policy-file", str(TOY_POLICY)]
    made = cli.invoke(keys_app, ["create", "--name", "ops", "--policy", "trusted", *common])
    assert made.exit_code == 0, made.output
    assert "policy 'trusted'" in made.output
    (key,) = auth.list_keys(conn)
    assert key.policy == "trusted" and auth.key_policy(conn, key.id) == "trusted"
    listed = cli.invoke(keys_app, ["list", "--redis-url", redis_url])
    assert "[policy trusted]" in listed.output
    bad = cli.invoke(keys_app, ["create", "--name", "x", "--policy", "admin", *common])
    # Typer boxes the error and wraps it at the terminal's width: compare the words only.
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", bad.output).split())
    assert bad.exit_code == 2 and "no policy 'admin'" in words, bad.output
    assert len(auth.list_keys(conn)) == 1
    unchecked = cli.invoke(keys_app, ["create", "--name", "y", "--policy", "trusted",
                                      "--redis-url", redis_url], env={"STEER_POLICY_FILE": ""})
    assert unchecked.exit_code == 0 and "was not checked" in unchecked.output


def test_old_key_records_without_a_policy_still_load(conn):
    conn.hset(auth.KEYS_HASH, "abc", '{"id": "abc", "name": "n", "prefix": "steer_x", '
              '"sha256": "00", "created_at": 1.0}')
    assert auth.key_policy(conn, "abc") is None and auth.list_keys(conn)[0].policy is None
