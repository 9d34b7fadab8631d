"""SSRF guard for webhook URLs: no deliveries to this host's or its network's private addresses.

A webhook makes the service send a request wherever a client says, from inside the
deployment, so a URL such as ``http://169.254.169.254/`` (cloud metadata) or
``http://redis:6379/`` must not be accepted. An address is refused when it is loopback,
private, link-local, multicast, reserved, unspecified or shared (CGNAT) — IPv4-mapped IPv6
addresses are judged as the IPv4 they carry — unless a network or host name in
``STEER_WEBHOOK_ALLOWED`` lets it through (e.g. ``["10.1.0.0/16", "hooks.internal"]``).

Checked twice: at submission without DNS (literal addresses and ``localhost`` names, a 422
naming the field: the gateway's event loop must not wait on a resolver) and at delivery with
every address the name resolves to (a worker; refused deliveries are logged and not retried).
Deliveries do not follow redirects. What is left: a name whose DNS answer changes between the
delivery's check and httpx's own lookup (DNS rebinding within that window).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]


class WebhookRefused(ValueError):
    """The webhook URL points at an address this deployment does not deliver to."""


def resolve_host(host: str) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and routes to, if any: IPv4-mapped,
    IPv4-compatible, NAT64 (64:ff9b::/96), 6to4 (2002::/16) or Teredo's client."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _blocked(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None and _blocked(inner):
            return True
    return not address.is_global or address.is_multicast


def _allowed(address: Address, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry
    return False


def _host(url: str) -> str:
    host = urlsplit(url).hostname
    if not host:
        raise WebhookRefused(f"{url!r} has no host")
    return host.rstrip(".").lower()


def _literal(host: str) -> Address | None:
    """The address a host written as one stands for (``[::1]``, ``127.0.0.1``), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])  # drop a zone id
    except ValueError:
        return None


def _check_address(host: str, address: Address, allowed: Sequence[str]) -> None:
    if _blocked(address) and not _allowed(address, allowed):
        shown = host if _literal(host) == address else f"{host} ({address})"
        raise WebhookRefused(f"{shown} is a private, loopback or otherwise non-public address; "
                             "webhooks go to public hosts unless STEER_WEBHOOK_ALLOWED lists it")


def _check_without_dns(url: str, allowed: Sequence[str]) -> str | None:
    """Refuse what can be refused without DNS; the host name still to resolve, or None when
    the URL is decided (allow-listed, or a public literal address)."""
    host = _host(url)
    if host in (a.lower() for a in allowed):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        raise WebhookRefused(f"{host} is this machine; webhooks go to public hosts unless "
                             "STEER_WEBHOOK_ALLOWED lists it")
    address = _literal(host)
    if address is None:
        return host
    _check_address(host, address, allowed)
    return None


def check_url(url: str, allowed: Sequence[str]) -> None:
    """Refuse, without DNS, a URL whose host is a non-public literal address or a
    ``localhost`` name (submission time)."""
    _check_without_dns(url, allowed)


def check_delivery(url: str, allowed: Sequence[str], resolve: Resolver = resolve_host) -> None:
    """Refuse a URL whose host is, or resolves to, any non-public address (delivery time)."""
    host = _check_without_dns(url, allowed)
    if host is None:
        return
    try:
        addresses = resolve(host)
    except OSError as exc:
        raise WebhookRefused(f"{host} does not resolve: {exc}") from exc
    for text in addresses:
        address = _literal(text)
        if address is None:
            raise WebhookRefused(f"{host} resolved to {text!r}, not an address")
        _check_address(host, address, allowed)
