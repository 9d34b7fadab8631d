"""Cancel reaches a running job through an in-process flag: the cancel watcher sets it when
the cancel is announced (or found), the generation reads only the flag, and no step makes a
Redis call to learn of a cancel."""

from __future__ import annotations

import time

import redis

from service import runner
from service.jobstore import cancel_channel, request_cancel
from tests.service.worker_support import record, run_queued, submit


def test_announced_cancel_sets_the_flag_at_once(conn):
    with runner.cancel_watch(conn, "job-announced", poll_s=30.0) as flag:
        time.sleep(0.2)  # subscribed by now
        assert not flag.is_set()
        started = time.monotonic()
        request_cancel(conn, "job-announced", 60)
        assert flag.wait(5.0)
    # far below the 30 s poll: the announcement, not the poll, set it
    assert time.monotonic() - started < 2.0


def test_cancel_requested_before_the_watch_is_found(conn):
    request_cancel(conn, "job-early", 60)
    with runner.cancel_watch(conn, "job-early", poll_s=30.0) as flag:
        assert flag.wait(5.0)


def test_watch_ignores_other_jobs_and_ends_with_its_block(conn):
    with runner.cancel_watch(conn, "job-mine", poll_s=0.05) as flag:
        conn.publish(cancel_channel("job-other"), b"1")
        request_cancel(conn, "job-other", 60)
        time.sleep(0.3)
        assert not flag.is_set()
    time.sleep(0.3)
    assert not any(c.startswith(cancel_channel("job-mine").encode())
                   for c in conn.pubsub_channels())  # unsubscribed: the thread ended


def test_unreachable_redis_only_means_no_cancel():
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    with runner.cancel_watch(dead, "job-dark", poll_s=0.05) as flag:
        time.sleep(0.3)
        assert not flag.is_set()  # the job keeps generating


def test_steps_make_no_cancel_call_to_redis(conn, settings, monkeypatch):
    runner.configure(settings)
    polls: list[float] = []
    real = runner.cancel_requested

    def counted(c, job_id):
        polls.append(time.monotonic())
        return real(c, job_id)

    monkeypatch.setattr(runner, "cancel_requested", counted)
    job_id = submit(conn, settings, steps=40)
    started = time.monotonic()
    run_queued(conn, settings)
    took = time.monotonic() - started
    rec = record(conn, settings, job_id)
    assert rec.status == "succeeded", rec.error
    # one check before starting, one when the watcher subscribes, then one per poll
    # interval: bounded by time, not by the 40 steps
    assert len(polls) <= 2 + took / runner.CANCEL_POLL_S + 1, (len(polls), took)
