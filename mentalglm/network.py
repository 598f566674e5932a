"""What "this machine" means, for every address a run connects to or serves on (teacher URLs, serve.py's and the
rating page's `host`): a name or address that resolves to loopback only.

Checked on the parsed host before any connection: IP literals in any notation the resolver accepts (`127.1`,
`0x7f000001`, `::1`, `::ffff:127.0.0.1`), `localhost`, and names, whose every resolved address must be loopback.
A prefix test is not enough: `127.0.0.1.attacker.invalid` is someone else's machine.
"""

from __future__ import annotations

import ipaddress
import socket


def _loopback_ip(text: str) -> bool | None:
    """Whether an IP literal is loopback; None when `text` is no IP literal."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(text))  # 127.1, 0x7f.1, 2130706433
        except (OSError, ValueError):
            return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def is_loopback_host(host: str | None) -> bool:
    host = (host or "").strip().strip("[]").rstrip(".").lower()
    if not host:
        return False
    if host == "localhost":
        return True
    literal = _loopback_ip(host)
    if literal is not None:
        return literal
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False  # a name that does not resolve is not this machine
    return bool(addresses) and all(_loopback_ip(a.split("%")[0]) for a in addresses)


def free_port() -> int:
    """A TCP port free on loopback now (for a server this process starts there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
