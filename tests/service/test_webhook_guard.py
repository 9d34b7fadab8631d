"""SSRF guard for webhook URLs: refused addresses, the allow-list, DNS at delivery, and the API's
422 naming the field (hostile input)."""

import pytest
from fastapi.testclient import TestClient

from service.webhook_guard import WebhookRefused, check_delivery, check_url
from tests.service.conftest import fast_settings

REFUSED = [
    "http://127.0.0.1/hook", "http://127.1.2.3:8080/", "http://[::1]/", "http://0.0.0.0/",
    "http://10.0.0.5/", "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1%25eth0]/", "http://[fc00::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:a9fe:a9fe]/", "http://224.0.0.1/",
    "http://255.255.255.255/", "http://localhost:6379/", "http://api.localhost/",
    "http://LOCALHOST./",
    # IPv6 literals that carry an IPv4 address: IPv4-compatible, NAT64, 6to4
    "http://[::7f00:1]/", "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a9fe:a9fe]/",
]


@pytest.mark.parametrize("address", ["::7f00:1", "64:ff9b::a00:5", "2002:a9fe:a9fe::1"])
def test_a_name_resolving_to_an_embedded_private_ipv4_is_refused_at_delivery(address):
    with pytest.raises(WebhookRefused):
        check_delivery("https://hooks.example.com/", [], resolve=lambda host: [address])


@pytest.mark.parametrize("url", REFUSED)
def test_non_public_literal_addresses_and_localhost_are_refused_without_dns(url):
    with pytest.raises(WebhookRefused, match="STEER_WEBHOOK_ALLOWED"):
        check_url(url, [])


@pytest.mark.parametrize("url", ["https://93.184.216.34/hook", "https://[2606:4700::1111]/",
                                 "https://hooks.example.com/x"])
def test_public_addresses_and_names_pass_at_submission(url):
    check_url(url, [])


def test_the_allow_list_takes_networks_and_host_names():
    check_url("http://10.1.2.3/", ["10.1.0.0/16"])
    check_url("http://localhost:9000/", ["localhost"])
    check_delivery("http://hooks.internal/", ["hooks.internal"],
                   resolve=lambda host: pytest.fail("an allowed name is not resolved"))
    with pytest.raises(WebhookRefused):
        check_url("http://10.2.0.1/", ["10.1.0.0/16", "not a network"])


def test_delivery_refuses_a_name_that_resolves_to_any_private_address():
    public, rebinding = ["93.184.216.34"], ["93.184.216.34", "127.0.0.1"]
    check_delivery("https://hooks.example.com/", [], resolve=lambda host: public)
    with pytest.raises(WebhookRefused, match=r"hooks.example.com \(127.0.0.1\)"):
        check_delivery("https://hooks.example.com/", [], resolve=lambda host: rebinding)
    check_delivery("https://hooks.example.com/", ["127.0.0.1/32"],
                   resolve=lambda host: rebinding)

    def unresolvable(host):
        raise OSError("Name or service not known")

    with pytest.raises(WebhookRefused, match="does not resolve"):
        check_delivery("https://nowhere.invalid/", [], resolve=unresolvable)


def test_delivery_to_a_refused_address_is_not_sent_nor_retried(tmp_path, monkeypatch):
    from service import webhooks

    settings = fast_settings(tmp_path, None, webhook_allowed=[])
    monkeypatch.setattr("service.runner.current_settings", lambda: settings)
    monkeypatch.setattr(webhooks.httpx, "post", lambda *a, **k: pytest.fail("sent"))
    assert webhooks.deliver_generation("job", "http://169.254.169.254/") == 0


def test_the_api_refuses_a_private_webhook_with_a_422_naming_the_field(tmp_path, redis_url):
    from service.app import create_app

    body = {"prompt": "a red circle", "steps": 2, "webhook": "http://169.254.169.254/x"}
    settings = fast_settings(tmp_path, redis_url, webhook_allowed=[])
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/generations", json=body)
        assert r.status_code == 422 and r.json()["field"] == "webhook"
        assert "169.254.169.254" in r.json()["detail"]
        r = client.post("/v1/batches", json={"requests": [{"prompt": "a red circle"}],
                                             "webhook": "http://[::1]:8080/"})
        assert r.status_code == 422 and r.json()["field"] == "webhook"
        r = client.post("/v1/batches", json={"requests": [body]})
        assert r.status_code == 422 and r.json()["field"] == "requests[0].webhook"
        r = client.post("/v1/generations", json={**body, "webhook": "https://hooks.example.com/"})
        assert r.status_code == 202
