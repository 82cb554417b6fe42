"""Who is the client, and did the request arrive over HTTPS? The one place that decides.

`X-Forwarded-For` and `X-Forwarded-Proto` are believed only when the direct
peer is a trusted proxy (TRUSTED_PROXIES, CIDRs such as the ALB subnets).
Anybody else can write those headers, so from an untrusted peer they are
ignored and the peer address is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import Scope

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN_CLIENT = "unknown"


def _parse_ip(value: str) -> IPAddress | None:
    text = value.strip()
    # "[2001:db8::1]:443" and "203.0.113.7:5000" are seen from some proxies.
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class TrustedProxies:
    """A set of CIDRs whose forwarding headers are believed."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip()
        )

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            parsed = _parse_ip(address)
        elif isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            parsed = address
        else:
            return False
        if parsed is None:
            return False
        return any(parsed in network for network in self.networks)


def _header_values(scope: Scope, name: str) -> list[str]:
    """Every comma-separated item of every `name` header, in order of arrival."""
    items = (
        part.strip() for value in Headers(scope=scope).getlist(name) for part in value.split(",")
    )
    return [item for item in items if item]


def peer_address(scope: Scope) -> str | None:
    """The address of the directly connected peer, if the server reported one."""
    client = scope.get("client")
    if client:
        return str(client[0])
    return None


def client_ip(scope: Scope, trusted: TrustedProxies) -> str:
    """The client's address.

    From a trusted peer, `X-Forwarded-For` is read right to left and every
    trusted hop is skipped; the first untrusted address is the client. Entries
    to its left were written by the client and are never used.
    """
    peer = peer_address(scope)
    if peer is None:
        return UNKNOWN_CLIENT
    if peer not in trusted:
        return peer
    candidate = peer
    for hop in reversed(_header_values(scope, "x-forwarded-for")):
        address = _parse_ip(hop)
        if address is None:
            # Garbage can only come from the client's own part of the header:
            # stop at the last hop a trusted proxy vouched for.
            return candidate
        candidate = str(address)
        if address not in trusted:
            return candidate
    return candidate


def is_https(scope: Scope, trusted: TrustedProxies) -> bool:
    """Whether the client connected over TLS (directly, or to a trusted proxy)."""
    if scope.get("scheme") in ("https", "wss"):
        return True
    peer = peer_address(scope)
    if peer is None or peer not in trusted:
        return False
    protos = _header_values(scope, "x-forwarded-proto")
    # The nearest proxy appends last; that is the hop that saw the client's scheme.
    return bool(protos) and protos[-1].lower() == "https"
