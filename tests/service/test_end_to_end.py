"""The whole service on the toy pipeline: the gateway app (TestClient) and a `steer worker`
process sharing a real Redis and the image folder. A steered request and the unsteered one
with the same seed: both PNGs come back through signed links, carry their provenance, and
differ; a batch of 10 is polled until every job has succeeded."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.images import read_png_text
from tests.service.api_support import api_client, poll
from tests.service.worker_support import TOY_BUNDLE_SHA, wait_ready

PROMPT = "a red circle on a striped background"


def test_submit_poll_png_with_provenance_and_steering_changes_it(settings, conn, spawn,
                                                                   wait_for, tmp_path):
    wait_ready(conn, spawn("e2e"), wait_for)
    with api_client(settings) as client:
        jobs = {name: client.post("/v1/generations", json={
                    "prompt": PROMPT, "seed": 11, "steps": 20, "concepts": concepts}).json()
                for name, concepts in (("plain", []), ("steered", [{"name": "red"}]))}
        assert all(j["status"] == "queued" for j in jobs.values())
        done = {name: poll(client, j["links"]["self"], wait_for) for name, j in jobs.items()}
        pixels = {}
        for name, job in done.items():
            assert job["status"] == "succeeded", job
            assert job["seeds"] == [11] and job["progress"] == {"step": 20, "total": 20}
            assert job["provenance"]["bundle_sha256"] == TOY_BUNDLE_SHA
            (image,) = job["images"]
            png = client.get(image["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            path = tmp_path / f"{name}.png"
            path.write_bytes(png.content)
            text = read_png_text(path)
            assert PROMPT in text["parameters"] and "Seed: 11" in text["parameters"]
            assert "sae-steering" in text
            pixels[name] = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
        steered = done["steered"]["parameters"]["concepts"]
        assert steered[0]["name"] == "red" and steered[0]["gamma"] > 0  # defaults filled in
        assert np.abs(pixels["plain"].astype(int) - pixels["steered"].astype(int)).max() > 0
        assert "red" in done["plain"]["detection"][0]


def test_batch_of_ten_is_polled_to_completion(settings, conn, spawn, wait_for):
    wait_ready(conn, spawn("e2e-batch"), wait_for)
    with api_client(settings) as client:
        requests = [{"prompt": PROMPT, "seed": 100 + i, "steps": 4} for i in range(10)]
        batch = client.post("/v1/batches", json={"requests": requests})
        assert batch.status_code == 202, batch.text
        url = f"/v1/batches/{batch.json()['id']}"
        final = poll(client, url, wait_for, done=("succeeded", "failed", "canceled"))
        assert final["counts"] == {"succeeded": 10}
        assert [g["seeds"] for g in final["generations"]] == [[100 + i] for i in range(10)]
        assert all(len(g["images"]) == 1 for g in final["generations"])
