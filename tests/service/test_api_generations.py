"""Gateway: submit, validate (422 per field, 413), read, cancel and delete generations and
batches, on a real Redis with no worker (jobs stay queued unless a test moves them)."""

from __future__ import annotations

import json
import uuid

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from service import jobstore
from service.routes.generations import prefer_wait
from tests.service.api_support import api_client, body


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


@pytest.fixture
def queue(conn, settings):
    return Queue(settings.queue_name, connection=conn)


def test_submit_queues_a_job_with_links_seeds_and_the_request_id(client, conn, queue):
    r = client.post("/v1/generations", json=body(seed=11, n_images=3),
                    headers={"X-Request-ID": "req-42"})
    assert r.status_code == 202, r.text
    gen = r.json()
    assert gen["status"] == "queued" and gen["queue_position"] == 0
    assert gen["seeds"] == [11, 12, 13]
    assert r.headers["X-Request-ID"] == "req-42"
    assert r.headers["Location"] == gen["links"]["self"]
    assert gen["links"]["self"].endswith(f"/v1/generations/{gen['id']}")
    assert gen["links"]["cancel"] == gen["links"]["self"] + "/cancel"
    job = Job.fetch(gen["id"], connection=conn)
    assert job.meta["request_id"] == "req-42"
    assert job.kwargs["payload"]["seed"] == 11 and job.kwargs["payload"]["n_images"] == 3
    assert queue.job_ids == [gen["id"]]
    second = client.post("/v1/generations", json=body()).json()
    assert second["queue_position"] == 1
    assert client.get(f"/v1/generations/{second['id']}").json()["queue_position"] == 1


def test_a_missing_seed_is_drawn_at_submission_and_kept(client, conn):
    gen = client.post("/v1/generations", json=body(n_images=2)).json()
    seed = gen["seeds"][0]
    assert gen["seeds"] == [seed, seed + 1]
    assert Job.fetch(gen["id"], connection=conn).kwargs["payload"]["seed"] == seed


def test_a_bad_request_id_is_replaced(client):
    r = client.post("/v1/generations", json=body(), headers={"X-Request-ID": "bad id\x7f"})
    assert r.status_code == 202
    assert r.headers["X-Request-ID"] != "bad id\x7f" and len(r.headers["X-Request-ID"]) == 32


LONG = "x" * 1001


@pytest.mark.parametrize("overrides, field", [
    ({"prompt": LONG}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"negative_prompt": LONG}, "negative_prompt"),
    ({"steps": 0}, "steps"),
    ({"steps": 151}, "steps"),
    ({"width": 33}, "width"),
    ({"height": 2048}, "height"),
    ({"width": 0}, "width"),
    ({"n_images": 0}, "n_images"),
    ({"n_images": 9}, "n_images"),
    ({"guidance": -1}, "guidance"),
    ({"guidance": 31}, "guidance"),
    ({"seed": -1}, "seed"),
    ({"scheduler": "euler"}, "scheduler"),
    ({"concepts": [{"name": "red", "gamma": 1000}]}, "concepts[0].gamma"),
    ({"concepts": [{"name": "red", "gamma": 0.1}]}, "concepts[0].gamma"),
    ({"concepts": [{"name": "red", "percentile": 100}]}, "concepts[0].percentile"),
    ({"concepts": [{"name": "red", "percentile": -0.5}]}, "concepts[0].percentile"),
    ({"concepts": [{"name": "red"}, {"name": "purple"}]}, "concepts[1].name"),
    ({"concepts": [{"name": "red", "direction": "sideways"}]}, "concepts[0].direction"),
    ({"extra": 1}, "extra"),
])
def test_each_invalid_field_is_a_422_naming_it(client, queue, overrides, field):
    r = client.post("/v1/generations", json=body(**overrides))
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["field"] == field
    assert field in error["detail"]
    assert queue.count == 0


def test_unknown_concept_lists_the_known_ones_and_gamma_zero_is_off(client):
    r = client.post("/v1/generations", json=body(concepts=[{"name": "purple"}]))
    assert r.status_code == 422
    detail = r.json()["detail"]
    for known in ("red", "striped", "circle", "triangle"):
        assert known in detail
    ok = client.post("/v1/generations", json=body(concepts=[{"name": "red", "gamma": 0}]))
    assert ok.status_code == 202, ok.text


def test_suppressing_every_concept_of_a_closed_kind_is_a_422_saying_why(client):
    # (blue last: blue and green swap into each other, a 422 of its own)
    colours = [{"name": c} for c in ("red", "green", "yellow", "blue")]
    r = client.post("/v1/generations", json=body(concepts=colours))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "concepts"
    assert "'colour' is closed" in r.json()["detail"] and "keep at least one" in r.json()["detail"]
    # three of the four, or all four with one turned off (γ 0), are fine
    ok = client.post("/v1/generations", json=body(concepts=colours[:3]))
    assert ok.status_code == 202, ok.text
    off = client.post("/v1/generations", json=body(concepts=[*colours[:3], {"name": "blue",
                                                                           "gamma": 0}]))
    assert off.status_code == 202, off.text


def test_settings_bound_the_limits(settings, redis_url, tmp_path):
    from tests.service.conftest import fast_settings

    tight = fast_settings(tmp_path / "tight", redis_url, max_prompt_chars=5, max_steps=3,
                          min_size=16, max_size=64, max_n_images=2)
    with api_client(tight) as c:
        def field_of(**overrides):
            return c.post("/v1/generations", json=body(prompt="abc", **overrides)).json()["field"]

        assert field_of(negative_prompt="abcdef") == "negative_prompt"
        assert field_of(steps=4) == "steps"
        assert field_of(width=8) == "width"
        assert field_of(height=72) == "height"
        assert field_of(n_images=3) == "n_images"
        assert c.post("/v1/generations", json=body(prompt="abcdef")).json()["field"] == "prompt"
        assert c.post("/v1/generations", json=body(prompt="abc", steps=3, width=64,
                                                   n_images=2)).status_code == 202


def test_malformed_json_is_a_422_on_the_body(client):
    r = client.post("/v1/generations", content=b'{"prompt": ',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["field"] == "body" and "JSON" in r.json()["detail"]


def test_body_over_the_limit_is_413_by_content_length_and_when_streamed(settings, redis_url,
                                                                         tmp_path, queue):
    from tests.service.conftest import fast_settings

    small = fast_settings(tmp_path / "small", redis_url, max_body_bytes=2000)
    big = json.dumps(body(negative_prompt="y" * 3000)).encode()
    with api_client(small) as c:
        r = c.post("/v1/generations", content=big,
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["detail"]
        assert "X-Request-ID" in r.headers

        def chunks():  # no Content-Length: chunked transfer encoding
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        r = c.post("/v1/generations", content=chunks(),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert "STEER_MAX_BODY_BYTES" in r.json()["detail"]
        assert c.post("/v1/generations", json=body()).status_code == 202
    assert queue.count == 1


def test_unknown_and_malformed_ids_are_404(client):
    for bad in (str(uuid.uuid4()), "not-a-uuid", str(uuid.uuid4()).upper()):
        r = client.get(f"/v1/generations/{bad}")
        assert r.status_code == 404
        assert r.json()["field"] == "id"
    assert client.get("/v1/generations/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/v1/nothing-here").json()["detail"].startswith("no such endpoint")


def test_cancel_while_queued_cancels_at_once(client, conn, queue):
    gen = client.post("/v1/generations", json=body()).json()
    r = client.post(f"/v1/generations/{gen['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert queue.count == 0
    assert jobstore.cancel_requested(conn, gen["id"])  # a worker that raced us stops too
    again = client.post(f"/v1/generations/{gen['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_cancel_while_running_sets_the_flag_and_answers_202(client, conn, queue):
    gen = client.post("/v1/generations", json=body()).json()
    job = Job.fetch(gen["id"], connection=conn)
    queue.remove(job)
    job.set_status(JobStatus.STARTED)  # as a worker would (the registry is not needed here)
    r = client.post(f"/v1/generations/{gen['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "running"
    assert jobstore.cancel_requested(conn, gen["id"])


def test_delete_removes_a_queued_job(client, conn, queue):
    gen = client.post("/v1/generations", json=body()).json()
    assert client.delete(f"/v1/generations/{gen['id']}").status_code == 204
    assert client.get(f"/v1/generations/{gen['id']}").status_code == 404
    assert queue.count == 0
    assert not conn.exists(Job.key_for(gen["id"]))
    assert client.delete(f"/v1/generations/{gen['id']}").status_code == 404


def test_prefer_wait_without_a_worker_answers_202_after_the_wait(client):
    r = client.post("/v1/generations", json=body(), headers={"Prefer": "wait=0.3"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert r.headers["Preference-Applied"] == "wait=0.3"


def test_prefer_wait_parsing():
    assert prefer_wait(None, 60) is None
    assert prefer_wait("respond-async", 60) is None
    assert prefer_wait("wait=5", 60) == 5
    assert prefer_wait("respond-async, wait=500", 60) == 60
    assert prefer_wait("handling=lenient; wait=\"2.5\"", 60) == 2.5
    assert prefer_wait("wait=soon", 60) is None
    assert prefer_wait("wait=-3", 60) == 0


def test_concepts_lists_the_bundle_with_defaults(client):
    data = client.get("/v1/concepts").json()
    assert len(data["bundle_sha256"]) == 64
    names = [c["name"] for c in data["concepts"]]
    assert names[:3] == ["dotted", "plain", "striped"] and "red" in names
    red = next(c for c in data["concepts"] if c["name"] == "red")
    assert red["gamma_range"][0] <= red["default_gamma"] <= red["gamma_range"][1]


def test_batch_submits_one_job_per_request_and_polls_as_one(client, conn, queue):
    requests = [body(seed=i, prompt=f"shape {i}") for i in range(10)]
    r = client.post("/v1/batches", json={"requests": requests})
    assert r.status_code == 202, r.text
    batch = r.json()
    assert batch["status"] == "queued" and batch["counts"] == {"queued": 10}
    ids = [g["id"] for g in batch["generations"]]
    assert queue.job_ids == ids
    assert [g["queue_position"] for g in batch["generations"]] == list(range(10))
    assert {Job.fetch(i, connection=conn).meta["batch_id"] for i in ids} == {batch["id"]}
    assert r.headers["Location"].endswith(f"/v1/batches/{batch['id']}")

    client.post(f"/v1/generations/{ids[0]}/cancel")
    client.delete(f"/v1/generations/{ids[1]}")
    polled = client.get(f"/v1/batches/{batch['id']}").json()
    assert polled["counts"] == {"canceled": 1, "deleted": 1, "queued": 8}
    assert polled["status"] == "queued" or polled["status"] == "running"
    assert client.get(f"/v1/generations/{ids[2]}").json()["batch_id"] == batch["id"]
    assert client.get(f"/v1/batches/{uuid.uuid4()}").status_code == 404


def test_batch_polls_share_one_read_and_count_towards_the_rate_limit(tmp_path, redis_url,
                                                                    conn, monkeypatch):
    """A batch of 10 polled 40 times: the jobs are read once per cache period (a long one
    here, so the count is exact), and the polls are rate-limited like submissions."""
    from service import auth
    from service.routes import batches
    from tests.service.conftest import fast_settings

    monkeypatch.setattr(batches, "RECENT", batches.RecentViews(ttl_s=3600))
    reads = []
    real = jobstore.read_generation
    monkeypatch.setattr(jobstore, "read_generation",
                        lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    settings = fast_settings(tmp_path / "d", redis_url, auth_enabled=True,
                             rate_limit_per_minute=30, per_key_max_queued=100)
    _, token = auth.create_key(conn, "poller")
    headers = {"Authorization": f"Bearer {token}"}
    with api_client(settings) as c:
        batch = c.post("/v1/batches", headers=headers,
                       json={"requests": [body(seed=i) for i in range(10)]}).json()
        reads.clear()
        codes = [c.get(f"/v1/batches/{batch['id']}", headers=headers).status_code
                 for _ in range(40)]
    assert len(reads) == 10  # one read of each job, shared by every poll
    assert codes[:29] == [200] * 29 and set(codes[29:]) == {429}  # the POST counted too


def test_batch_validation_names_the_item_and_the_size_limit(client, settings, queue):
    bad = [body(), body(concepts=[{"name": "red", "percentile": 100}])]
    r = client.post("/v1/batches", json={"requests": bad})
    assert r.status_code == 422 and r.json()["field"] == "requests[1].concepts[0].percentile"
    too_many = [body()] * (settings.max_batch_items + 1)
    r = client.post("/v1/batches", json={"requests": too_many})
    assert r.status_code == 422 and r.json()["field"] == "requests"
    r = client.post("/v1/batches", json={"requests": []})
    assert r.status_code == 422 and r.json()["field"] == "requests"
    assert queue.count == 0


def test_batch_status_rules():
    from service.views import batch_status

    assert batch_status(["queued", "queued"]) == "queued"
    assert batch_status(["queued", "running"]) == "running"
    assert batch_status(["succeeded", "queued"]) == "running"
    assert batch_status(["succeeded", "succeeded"]) == "succeeded"
    assert batch_status(["succeeded", "failed"]) == "partial"


def test_suppressing_concepts_whose_swaps_lead_into_each_other_is_a_422_naming_them(client):
    r = client.post("/v1/generations", json=body(concepts=[{"name": "blue"},
                                                           {"name": "green"}]))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "concepts"
    assert "blue → green → blue" in r.json()["detail"] and "keep one" in r.json()["detail"]
    chain = client.post("/v1/generations", json=body(concepts=[{"name": "red"},
                                                               {"name": "green"}]))
    assert chain.status_code == 202, chain.text  # red → green → blue: staged, served


def test_a_seed_whose_images_would_pass_the_seed_range_is_a_422(client):
    """Image i uses seed + i: seed 2**63 - 1 with 8 images returned seeds that could not be
    submitted again."""
    r = client.post("/v1/generations", json=body(seed=2**63 - 1, n_images=2))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "seed" and str(2**63 - 2) in r.json()["detail"]
    ok = client.post("/v1/generations", json=body(seed=2**63 - 2, n_images=2))
    assert ok.status_code == 202, ok.text


def test_a_concept_named_twice_is_a_422(client):
    """Suppressing and amplifying the same concept in one request was accepted."""
    r = client.post("/v1/generations", json=body(concepts=[
        {"name": "red"}, {"name": "red", "direction": "amplify"}]))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "concepts[1].name"
    assert "concepts[0]" in r.json()["detail"] and "once" in r.json()["detail"]


def test_limits_follow_the_loaded_pipeline(client):
    """The toy model's native side is 32: sides up to 64, and a budget of 32² × 50 steps
    × 8 images pixel-steps per job (a 1024² request used to be accepted and ran for hours)."""
    big = client.post("/v1/generations", json=body(width=128))
    assert big.status_code == 422 and big.json()["field"] == "width"
    assert "native side is 32" in big.json()["detail"]
    assert client.post("/v1/generations", json=body(width=64, height=64)).status_code == 202
    costly = client.post("/v1/generations", json=body(width=64, height=64, steps=150))
    assert costly.status_code == 422 and costly.json()["field"] == "steps"
    assert "budget of 409,600" in costly.json()["detail"]
    assert client.post("/v1/generations", json=body(steps=50, n_images=8)).status_code == 202
    assert client.post("/v1/generations",
                       json=body(steps=51, n_images=8)).status_code == 422


def test_an_explicit_budget_and_size_replace_the_derived_ones(redis_url, tmp_path):
    from tests.service.conftest import fast_settings

    settings = fast_settings(tmp_path / "d", redis_url, max_size=128, max_job_cost=10_000)
    with api_client(settings) as c:
        assert c.post("/v1/generations", json=body(width=128, height=8,
                                                   steps=9)).status_code == 202
        r = c.post("/v1/generations", json=body(steps=10))  # 32 × 32 × 10 > 10,000
        assert r.status_code == 422 and "budget of 10,000" in r.json()["detail"]


def test_native_size_is_read_from_the_configs_of_any_sd_folder(tmp_path):
    from service.job_limits import native_size

    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 64}')
    (tmp_path / "vae" / "config.json").write_text(
        '{"block_out_channels": [128, 256, 512, 512]}')
    assert native_size(tmp_path) == 512  # SD-1.x
    assert native_size(tmp_path / "missing") is None
