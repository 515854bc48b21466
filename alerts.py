"""Alerts: each change of status, queued in the transaction that makes it (an outbox),
told in the server window, and POSTed as JSON to the alert URL, at least once each.

A receiver's answer decides what becomes of an alert: 2xx delivered it; 307 and 308 are
followed (they keep the POST); any other answer, an error, or no whole answer within
ATTEMPT_SECONDS is a failure, retried after a backoff with the alerts after it waiting
behind it, so that a receiver sees them in order; except a 4xx other than 408 and 429,
which refuses that alert for good: it is kept, marked refused, told once, and the next
one goes.
"""

import argparse
import http.client
import json
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections import Counter

from fleetmon import MAX_BODY_BYTES, human_duration, ms_to_rfc3339

# `delivered` in the alerts table.
WAITING, DELIVERED, REFUSED = 0, 1, 2
# An attempt's whole time, from connecting to the answer's last byte: a receiver that
# drips its answer cannot hold delivery up past it.
ATTEMPT_SECONDS = 5
RETRY_MAX_SECONDS = 60
MAX_REDIRECTS = 3
PENDING_READ = 100

QUEUED = "SELECT alerts.*, device_id FROM alerts JOIN devices USING (device_key)"


def queue(db: sqlite3.Connection, device_key: int, status: str, at_ms: int, silent_since_ms: int) -> None:
    """Queue an alert, inside the caller's transaction."""
    db.execute("INSERT INTO alerts (device_key, status, at_ms, last_heard_ms) VALUES (?, ?, ?, ?)",
               (device_key, status, at_ms, silent_since_ms))


def newest_id(db: sqlite3.Connection) -> int:
    return db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]


def read_since(db: sqlite3.Connection, alert_id: int) -> list[sqlite3.Row]:
    return db.execute(f"{QUEUED} WHERE id > ? ORDER BY id", (alert_id,)).fetchall()


def count_waiting(db: sqlite3.Connection) -> int:
    return db.execute("SELECT count(*) FROM alerts WHERE NOT delivered").fetchone()[0]  # along alerts_to_deliver


def read_waiting(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return db.execute(f"{QUEUED} WHERE NOT delivered ORDER BY id LIMIT {PENDING_READ}").fetchall()  # along alerts_to_deliver


def text_of(alert: sqlite3.Row) -> str:
    """The line a change of status prints in the server window."""
    silent_for = human_duration((alert["at_ms"] - alert["last_heard_ms"]) * 1_000_000)
    if alert["status"] == "down":
        clock = ms_to_rfc3339(alert["last_heard_ms"])[11:19]
        return f"fleetmon: {alert['device_id']} is down (last heard {clock} UTC, {silent_for} ago)"
    return f"fleetmon: {alert['device_id']} is up again after {silent_for}"


def chat_text(alert: sqlite3.Row) -> str:
    """text_of for Slack and Mattermost, which read `text` as markup: the device id as
    code, and &, < and > escaped as Slack asks, so that no id mentions a channel or
    makes a link."""
    escaped = alert["device_id"].replace("`", "'").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text_of(alert).replace(alert["device_id"], f"`{escaped}`", 1)


def payload(alert: sqlite3.Row) -> dict:
    """The JSON POSTed for an alert. `silent_since`: when the device was last heard
    before this change; for an "up" alert, when its outage began."""
    return {
        "id": alert["id"],
        "device_id": alert["device_id"],
        "status": alert["status"],
        "at": ms_to_rfc3339(alert["at_ms"]),
        "silent_since": ms_to_rfc3339(alert["last_heard_ms"]),
        # Never negative, even across a clock stepped back.
        "outage_seconds": max(0, alert["at_ms"] - alert["last_heard_ms"]) / 1000 if alert["status"] == "up" else None,
        "text": chat_text(alert),
    }


def shown_url(url: str) -> str:
    """A URL as fleetmon shows it: scheme and host only, since a webhook's path is its secret."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


class Failure(Exception):
    """An attempt that did not deliver; final if the receiver refused the alert for good."""

    def __init__(self, reason: str, final: bool = False):
        super().__init__(reason)
        self.final = final


class AlertDelivery:
    """Sends the queued alerts to the alert URL, oldest first. Without an alert URL, an
    alert is delivered by having been printed."""

    def __init__(self, url: str | None, announce=print, outcomes: Counter | None = None):
        self.url = url
        self.announce = announce
        self.retry_after = 0.0  # seconds, after a failure
        self.next_attempt = 0.0  # monotonic
        self.outcomes = Counter() if outcomes is None else outcomes  # "delivered", "refused": for /metrics
        self._socket_lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._stopped = False

    def step(self, db: sqlite3.Connection, monotonic_now: float) -> int:
        """Deliver what is queued, until a failure; returns how many were delivered."""
        if monotonic_now < self.next_attempt:
            return 0
        delivered = 0
        for alert in read_waiting(db):
            try:
                if self.url:
                    self.send(alert)
            except Failure as failure:
                if not failure.final:
                    self.retry_after = min(max(1.0, 2 * self.retry_after), RETRY_MAX_SECONDS)
                    self.next_attempt = monotonic_now + self.retry_after
                    self.announce(f"fleetmon: alert {alert['id']} ({alert['device_id']} {alert['status']}) not "
                                  f"delivered to {shown_url(self.url)}: {failure}; trying again in "
                                  f"{human_duration(int(self.retry_after * 1e9))}")
                    return delivered
                self.announce(f"fleetmon: alert {alert['id']} ({alert['device_id']} {alert['status']}) refused by "
                              f"{shown_url(self.url)}: {failure}; it is kept, and not sent again")
                self.mark(db, alert["id"], REFUSED)
                continue
            self.retry_after = 0.0
            self.mark(db, alert["id"], DELIVERED)
            delivered += 1
        return delivered

    def mark(self, db: sqlite3.Connection, alert_id: int, outcome: int) -> None:
        db.execute("UPDATE alerts SET delivered = ? WHERE id = ?", (outcome, alert_id))
        self.outcomes["delivered" if outcome == DELIVERED else "refused"] += 1

    def send(self, alert: sqlite3.Row) -> None:
        """POST one alert, following 307 and 308; raises Failure unless it was taken."""
        body = json.dumps(payload(alert)).encode()
        deadline = time.monotonic() + ATTEMPT_SECONDS
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            status, location = self.post(url, body, deadline)
            if status in (307, 308) and location:
                url = urllib.parse.urljoin(url, location)
                continue
            break
        else:
            raise Failure(f"HTTP {status}, redirected more than {MAX_REDIRECTS} times")
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            where = shown_url(urllib.parse.urljoin(url, location)) if location else "nowhere"
            raise Failure(f"HTTP {status}, a redirect to {where}, which would not keep the POST")
        raise Failure(f"HTTP {status}", final=400 <= status < 500 and status not in (408, 429))

    def post(self, url: str, body: bytes, deadline: float) -> tuple[int, str | None]:
        """One POST: the answer's status and Location, read whole before the deadline."""
        parts = urllib.parse.urlsplit(url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Failure(f"no answer within {ATTEMPT_SECONDS} s")
        connection = connection_class(parts.hostname, parts.port, timeout=remaining)
        # Past the deadline the socket is shut, which ends a read that a dripping answer
        # would keep going (a socket timeout bounds each read, not the whole); what was
        # read by then is no whole answer, though http.client may take an end for one.
        timed_out = threading.Event()
        watchdog = threading.Timer(remaining, lambda: (timed_out.set(), self.abort()))
        try:
            connection.connect()
            with self._socket_lock:
                if self._stopped:
                    raise Failure("fleetmon is stopping")
                self._socket = connection.sock
            watchdog.start()
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("POST", target, body, {"Content-Type": "application/json"})
            with connection.getresponse() as response:
                response.read(MAX_BODY_BYTES)
                answer = response.status, response.getheader("Location")
        except (OSError, http.client.HTTPException) as error:
            if timed_out.is_set():
                raise Failure(f"no answer within {ATTEMPT_SECONDS} s") from None
            with self._socket_lock:
                stopping = self._stopped
            # One line: what a receiver sent may be in the reason, line breaks and all.
            raise Failure("fleetmon is stopping" if stopping else " ".join(str(error).split()) or
                          type(error).__name__) from None
        finally:
            watchdog.cancel()
            if watchdog.is_alive():
                watchdog.join()
            with self._socket_lock:
                self._socket = None
            connection.close()
        if timed_out.is_set():
            raise Failure(f"no answer within {ATTEMPT_SECONDS} s")
        return answer

    def abort(self) -> None:
        """End the attempt under way, if any, at once: a read blocked on its socket ends
        when the socket is shut down on Linux and macOS, and when it is closed on Windows."""
        with self._socket_lock:
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                if sys.platform == "win32":
                    # Its handle taken from the socket, whose later close() then does nothing.
                    socket.socket(fileno=self._socket.detach()).close()
                self._socket = None

    def stop(self) -> None:
        """End the attempt under way and let no other begin: fleetmon is stopping."""
        with self._socket_lock:
            self._stopped = True
        self.abort()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alert-url", type=web_url, metavar="URL", help="POST each change of status here as JSON "
                        "(a Slack or Mattermost incoming webhook shows its text)")


def web_url(text: str) -> str:
    """--alert-url: an http or https URL with a host."""
    try:
        parts = urllib.parse.urlsplit(text)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an address that is no URL, such as http://[::1/hook
        usable = False
    if not usable:
        raise argparse.ArgumentTypeError("must be an http:// or https:// URL with a host, like https://example.com/hook")
    return text
