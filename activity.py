"""The server window's activity line: what fleetmon answered since the last line, told
every ACTIVITY_SECONDS and once more at the stop, and nothing while idle."""

import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

from flask import Flask

ACTIVITY_SECONDS = 10
# The answers the line counts, by the endpoint that gives them.
KINDS = {"api.post_heartbeat": "heartbeat", "api.post_stats": "upload", "api.get_stats": "stats read"}


class Activity:
    """Telemetry answered, and every error fleetmon answers (not those waitress answers
    itself, before fleetmon sees the request)."""

    def __init__(self, answers: Callable[[], Counter[tuple[str, int]]], monotonic_now: float):
        self._answers = answers  # the app's count, by (endpoint, status), so far
        self._told = answers()
        self._since = monotonic_now

    def take_line(self, monotonic_now: float) -> str | None:
        """The line for what was answered since the last call, or None if nothing was."""
        answered = self._answers()
        new, self._told = answered - self._told, answered
        seconds, self._since = monotonic_now - self._since, monotonic_now
        telemetry, errors = Counter(), Counter()
        for (endpoint, status), count in new.items():
            if status >= 400:
                errors[status] += count
            elif endpoint in KINDS:
                telemetry[KINDS[endpoint]] += count
        if not telemetry and not errors:
            return None
        parts = [f"{telemetry[kind]:,} {kind}{'' if telemetry[kind] == 1 else 's'}" for kind in KINDS.values()]
        rejected = sum(n for status, n in errors.items() if status < 500)
        parts.append(f"{rejected:,} rejected")
        if rejected < errors.total():
            parts.append(f"{errors.total() - rejected:,} failed")
        line = f"fleetmon: last {seconds:.0f} s: " + ", ".join(parts)
        if errors:
            line += " (" + ", ".join(f"{status} x{n:,}" for status, n in sorted(errors.items())) + ")"
        return line


@contextmanager
def reporting(app: Flask, announce=print):
    """The activity line, every ACTIVITY_SECONDS for as long as the server runs."""
    activity = Activity(app.extensions["fleetmon.answers"], time.monotonic())
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(ACTIVITY_SECONDS):
            line = activity.take_line(time.monotonic())
            if line:
                announce(line)

    reporter = threading.Thread(target=report, name="fleetmon activity")
    reporter.start()
    try:
        yield activity
    finally:
        stop.set()
        reporter.join()
        last_line = activity.take_line(time.monotonic())
        if last_line:
            announce(last_line)


def init_app(app: Flask) -> None:
    app.extensions["fleetmon.background"].append(reporting)
