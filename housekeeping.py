"""The background work beside the server: the watch on who is down, the server window's
line for each change, the checkpoint, retention, and alert delivery.

Two threads of its own: alert delivery in one, since a receiver may be slow, and the rest
in the other. Each round runs every duty in its own guard, so that one failing (a full
disk, say) never stops the others; a failure is logged as it begins, not every round. Each duty takes the time as an argument, so that the tests call a round
with the clock they choose; the threads only loop them.
"""

import logging
import sqlite3
import threading
import time
from collections import Counter
from contextlib import ExitStack, closing, contextmanager

from flask import Flask

import alerts
from fleetmon import StartupError, connect, human_duration, now_ms
from retention import Pruning
from status import Watch

ROUND_SECONDS = 0.5
# The checkpoint folds the write-ahead log into the database so that the log is reused from
# its start (and cut back to fleetmon.WAL_SIZE_LIMIT_BYTES): it stays bounded, and once a
# full disk is freed, what the log holds moves out of it at the next round.
CHECKPOINT_SECONDS = 5
log = logging.getLogger("fleetmon")


class Housekeeping:
    def __init__(self, app: Flask, announce=print):
        self.database = app.config["DATABASE"]
        self.stop = threading.Event()
        self.failures_seen: set[str] = set()  # every kind of failure logged in full once
        self.failing: dict[str, str] = {}  # duty: the kind of its failure, while it fails
        with ExitStack() as opened:  # closed again if the start goes no further
            try:
                self.db = opened.enter_context(closing(connect(self.database)))
                self.delivery_db = opened.enter_context(closing(connect(self.database)))
                self.watch = Watch(self.db, app.config["DOWN_AFTER_SECONDS"], time.monotonic(), announce)
                keep_days = app.config["KEEP_DAYS"]
                self.pruning = Pruning(self.db, keep_days, app.config["DEVICE_KEYS"]) if keep_days else None
            except sqlite3.Error as error:  # the database is read as the server starts
                raise StartupError(f"cannot use database {self.database}: {error}") from None
            self.connections = opened.pop_all()
        self.outcomes = app.extensions["fleetmon.alert_outcomes"]
        self.delivery = alerts.AlertDelivery(app.config["ALERT_URL"], announce, self.outcomes)
        self.next_checkpoint = 0.0
        self.pruning_busy = False
        app.extensions["fleetmon.heard"].append(self.watch.heard)
        if self.pruning:
            app.extensions["fleetmon.heard"].append(self.pruning.heard)
        self.threads = [threading.Thread(target=self.loop_rounds, name="fleetmon housekeeping"),
                        threading.Thread(target=self.loop_delivery, name="fleetmon alerts")]

    def guarded(self, duty: str, step, *arguments):
        """Run one duty. A failure is logged as it begins, in full the first time of its
        kind, and not again while the duty goes on failing alike (a full disk fails every
        round); the duty's recovery is logged too."""
        try:
            result = step(*arguments)
        except Exception as error:
            kind = f"{type(error).__name__}: {error}"
            if self.failing.get(duty) != kind:
                log.error("%s failed: %s", duty, kind, exc_info=error if kind not in self.failures_seen else None)
                self.failures_seen.add(kind)
                self.failing[duty] = kind
            return None
        if self.failing.pop(duty, None) is not None:
            log.warning("%s works again", duty)
        return result

    def round(self, monotonic_now: float, wall_now_ms: int) -> None:
        """One round of every duty but delivery."""
        self.guarded("status", self.watch.check, self.db, monotonic_now, wall_now_ms)
        for alert in self.guarded("alerts", self.watch.tell_changes, self.db) or ():
            self.outcomes[alert["status"]] += 1
        if monotonic_now >= self.next_checkpoint:
            self.next_checkpoint = monotonic_now + CHECKPOINT_SECONDS
            self.guarded("checkpoint", self.db.execute, "PRAGMA wal_checkpoint(PASSIVE)")
        if self.pruning:
            self.pruning_busy = bool(self.guarded("retention", self.pruning.step, self.db, wall_now_ms))

    def loop_rounds(self) -> None:
        while not self.stop.is_set():
            self.round(time.monotonic(), now_ms())
            self.stop.wait(0.005 if self.pruning_busy else ROUND_SECONDS)

    def loop_delivery(self) -> None:
        while not self.stop.is_set():
            self.guarded("alert delivery", self.delivery.step, self.delivery_db, time.monotonic())
            self.watch.wake_delivery.wait(1.0)
            self.watch.wake_delivery.clear()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        self.delivery.stop()
        self.watch.wake_delivery.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join()
        self.connections.close()


@contextmanager
def running(app: Flask, announce=print):
    """The housekeeping, for as long as the server runs."""
    housekeeping = Housekeeping(app, announce)
    try:
        config = app.config
        announce(f"fleetmon: a device is down after {human_duration(int(config['DOWN_AFTER_SECONDS'] * 1e9))} unheard"
                 + (f"; alerts to {alerts.shown_url(config['ALERT_URL'])}" if config["ALERT_URL"] else "")
                 + (f"; history kept {config['KEEP_DAYS']} day{'s' if config['KEEP_DAYS'] != 1 else ''}"
                    if config["KEEP_DAYS"] else ""))
        housekeeping.start()
        yield housekeeping
    finally:
        housekeeping.close()


def init_app(app: Flask) -> None:
    app.extensions["fleetmon.alert_outcomes"] = Counter()  # "down", "up", "delivered", "refused": for /metrics
    app.extensions["fleetmon.background"].append(running)
