"""Who may do what. Devices, anyone who reaches the port: the contract's three endpoints,
with no credentials, as the vendor's simulator sends them. Operators: everything else
(the pages, the fleet API, /metrics, the debug views, the docs): open on a loopback
address, and beyond it behind HTTP Basic authentication (user `fleetmon`) with the
operator's password.

And what a browser acting for another site must not do, even on loopback: write (a POST
carrying a foreign Origin is refused), or read through a name that points at this
machine for a moment (DNS rebinding: only the names fleetmon is reached by are answered).
Its pages carry a Content-Security-Policy that lets only fleetmon's own script and styles
run, with a nonce for those written in the page.
"""

import argparse
import hmac
import ipaddress
import os
import secrets
import socket
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

from flask import Flask, abort, g, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import TooManyRequests, Unauthorized

from fleetmon import StartupError

OPERATOR = "fleetmon"
PASSWORD_VARIABLE = "FLEETMON_PASSWORD"
# Failed passwords from one address before it is answered 429, and for how long.
FAILURES_ALLOWED = 5
LOCKED_OUT_SECONDS = 60
ADDRESSES_REMEMBERED = 10_000
HOSTS_REMEMBERED = 100
CONTRACT = {"api.post_heartbeat", "api.post_stats", "api.get_stats"}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-file", type=Path, metavar="PATH", help="the operator's password, for the "
                        "pages, the fleet API, /metrics and the docs when listening beyond loopback "
                        f"(or set {PASSWORD_VARIABLE})")
    parser.add_argument("--open-to-all", action="store_true", help="beyond loopback with no password: leave the "
                        "operator's views open to anyone who reaches the port, knowingly")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a further host name fleetmon is reached by (a proxy's, say); repeatable")


def operator_settings(args: argparse.Namespace) -> dict:
    """create_app's settings for who may reach the operator's views, from the command
    line and the environment; StartupError where they do not add up."""
    host, password_file, open_to_all, allowed_hosts = args.host, args.password_file, args.open_to_all, args.allowed_host
    password = os.environ.get(PASSWORD_VARIABLE) or None
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            raise StartupError(f"cannot read password file {password_file}: {getattr(error, 'strerror', error)}") from None
        if not password:
            raise StartupError(f"password file {password_file} is empty")
    if password is None and not open_to_all and not is_loopback(host):
        raise StartupError(f"listening on {host}, beyond loopback, the operator's views need a password: give "
                           f"--password-file PATH or set {PASSWORD_VARIABLE}, or pass --open-to-all to leave them "
                           "open to anyone who reaches the port")
    return {"OPERATOR_PASSWORD": password, "ALLOWED_HOSTS": [host, *allowed_hosts]}


def origin_host(origin: str) -> str | None:
    try:
        return urllib.parse.urlsplit(origin).netloc or None
    except ValueError:
        return None


class Lockout:
    """Failed passwords by address; an address past FAILURES_ALLOWED waits it out."""

    def __init__(self):
        self._failures: dict[str, tuple[int, float]] = {}  # address: (count, first failure)
        self._lock = threading.Lock()

    def locked_out(self, address: str, now: float) -> float:
        """Seconds the address must wait yet, or 0."""
        with self._lock:
            count, since = self._failures.get(address, (0, now))
            if now - since >= LOCKED_OUT_SECONDS:
                self._failures.pop(address, None)
                return 0
            return LOCKED_OUT_SECONDS - (now - since) if count >= FAILURES_ALLOWED else 0

    def failed(self, address: str, now: float) -> None:
        with self._lock:
            count, since = self._failures.pop(address, (0, now))
            if now - since >= LOCKED_OUT_SECONDS:
                count, since = 0, now
            self._failures[address] = (count + 1, since)  # now the newest
            # Bounded, whatever the addresses: past the bound, the one that failed least lately goes.
            while len(self._failures) > ADDRESSES_REMEMBERED:
                del self._failures[next(iter(self._failures))]


class Gate:
    """What every request passes before it is served: its Host, the Origin of a write, and
    for the operator's views the password. What it needs is kept at hand, since it runs
    for every heartbeat: reading it through current_app on each request made the gate cost
    a heartbeat 48,000 instructions rather than 19,000, and the security headers' hook
    another 5,000 (callgrind, in-process)."""

    def __init__(self, app: Flask):
        self.password = app.config["OPERATOR_PASSWORD"]
        self.names = {"localhost", socket.gethostname().lower(), *(host.lower() for host in app.config["ALLOWED_HOSTS"])}
        self.verdicts: dict[str, bool] = {}  # Host header: whether it is ours
        self.lockout = Lockout()

    def host_is_ours(self, host_header: str) -> bool:
        """An address (no name can be rebound to one), a loopback name, this machine's
        name, or a name the operator listed."""
        verdict = self.verdicts.get(host_header)
        if verdict is None:
            name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
            name = name.strip("[]").lower()
            try:
                ipaddress.ip_address(name)
                verdict = True
            except ValueError:
                verdict = name in self.names
            if len(self.verdicts) < HOSTS_REMEMBERED:
                self.verdicts[host_header] = verdict
        return verdict

    def check(self) -> None:
        environ = request.environ
        host = environ.get("HTTP_HOST", "")
        if not self.host_is_ours(host):
            abort(400, f"this fleetmon is not reached by the name {host!r} (--allowed-host adds one)")
        origin = environ.get("HTTP_ORIGIN")
        # By host alone: behind a proxy that adds TLS, the browser's https:// origin is fleetmon's own.
        if origin is not None and environ["REQUEST_METHOD"] not in ("GET", "HEAD", "OPTIONS") \
                and origin_host(origin) != host:
            abort(403, "a browser acting for another site may not write here; nothing was stored")
        if self.password is not None and request.endpoint not in CONTRACT and request.endpoint is not None:
            self.require_operator(environ.get("REMOTE_ADDR", ""))

    def require_operator(self, address: str) -> None:
        now = time.monotonic()
        wait = self.lockout.locked_out(address, now)
        if wait:
            raise TooManyRequests(f"too many failed passwords from this address: try again in {wait:.0f} s",
                                  retry_after=int(wait) + 1)
        given = request.authorization
        if given is not None and given.type == "basic" and hmac.compare_digest(
                f"{given.username}:{given.password}".encode(), f"{OPERATOR}:{self.password}".encode()):
            return
        if given is not None:
            self.lockout.failed(address, now)
        raise Unauthorized("the operator's password is needed (user fleetmon)",
                           www_authenticate=WWWAuthenticate("basic", {"realm": "fleetmon", "charset": "UTF-8"}))


def csp_nonce() -> str:
    """The nonce of this answer's Content-Security-Policy, for a page's own script and style."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce


def secure_headers(response):
    if response.status_code == 204:  # no body to guard: every heartbeat's answer, at once
        return response
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if response.mimetype == "text/html":
        nonce = csp_nonce()
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Frame-Options"] = "DENY"
    return response


@contextmanager
def telling(app: Flask, announce=print):
    """The start line that says who may reach the operator's views."""
    if app.config["OPERATOR_PASSWORD"] is not None:
        announce(f"fleetmon: the operator's views need the password (user {OPERATOR}); devices need none")
    elif all(is_loopback(host) for host in app.config["ALLOWED_HOSTS"][:1]):
        announce("fleetmon: the operator's views are open to this machine alone (loopback)")
    else:
        announce("fleetmon: the operator's views are OPEN to anyone who reaches the port (--open-to-all)")
    yield


def init_app(app: Flask) -> None:
    app.config.setdefault("OPERATOR_PASSWORD", None)
    app.config.setdefault("ALLOWED_HOSTS", ["127.0.0.1"])
    gate = Gate(app)
    app.extensions["fleetmon.gate"] = gate
    app.before_request(gate.check)
    app.after_request(secure_headers)
    app.jinja_env.globals["csp_nonce"] = csp_nonce
    app.extensions["fleetmon.background"].append(telling)
