"""systemd notification protocol (sd_notify) without a dependency: READY, STOPPING, WATCHDOG.

Messages go to the datagram socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace); without it every call is a no-op, so the node runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one sd_notify message; return whether it was sent (never raises)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    """Tell systemd start-up is complete (Type=notify)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping() -> bool:
    """Tell systemd a clean shutdown has begun."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive for WatchdogSec=."""
    return notify("WATCHDOG=1")


def watchdog_interval_seconds() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds when the watchdog is on for this process, else ``None``."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.1)
    except ValueError:
        return None
