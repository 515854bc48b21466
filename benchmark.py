"""How fast fleetmon is, what it stores, how it bears overload, pruning, a silent alert
receiver and a large fleet, and how it upgrades a large database of the first layout.

    python benchmark.py                     the whole benchmark: about 17 minutes on 2 cores
    python benchmark.py --quick             every section briefly, as a smoke run
    python benchmark.py --against DIR       beside an earlier fleetmon: DIR/fleetmon.py
    python benchmark.py --only 6,7          some sections only
    python benchmark.py --only 1 --rounds 9 more turns in sections 1 to 3, for steadier medians

It prints figures and asserts nothing. Each server it measures is a process of its own on
a free loopback port, with its database in a temporary folder; by the end every one is
stopped and the folder removed. The sections:

1. Closed loop: 16, then 64 clients each POST (a heartbeat, or an upload) again as soon
   as they are answered, to fleetmon, to the earlier fleetmon of --against, and to a
   "floor": Flask on stock waitress with fleetmon's number of worker threads, doing
   nothing but parse the JSON body and answer 204. They take turns, round after round,
   every other round in reverse; the median round is shown, and a ratio is the median
   of the rounds' ratios.
2. The device simulator's burst: the day simulator.py sends the vendor's 5 devices, each
   device's from a client of its own, all at once, to each server fresh.
3. GET stats with 1,000 and with 1,000,000 online minutes stored: the latency should not
   move.
4. Overload: fleetmon's capacity in a closed loop, then 1.3 times that paced for 30 s,
   then 0.3 times for 10 s: how much it answers, and how soon it recovers.
5. How many devices: what N devices send, paced, for N in rising steps until the p99
   latency reaches 50 ms or a request fails.
6. Storage: a day of N devices sent over HTTP, in time order, shuffled, and heartbeats
   only; the database's growth a device-day, by table, and a year of a large fleet.
7. Pruning: a year of history built straight into the tables, pruned by --keep-days 7
   while heartbeats come in.
8. An alert receiver that accepts connections and never answers, while devices go down
   and up again and heartbeats come in.
9. How soon a device that falls silent is declared down, and up again when heard: the
   server's line and the alert it POSTs.
10. The fleet page and the fleet's API at 100,000 devices, alone and while heartbeats
   come in and browser tabs reload the page, plain and filtered, to the whole fleet too.
11. Upgrade: a database of the first layout, about 1.2 GB built straight with SQL,
   upgraded by fleetmon in a process of its own: how long, its peak memory, the peak of
   the write-ahead log and of the disk taken (about 3 GB of the temporary folder's), the
   file before and after, the free disk fleetmon asks for, and every device's stats the
   same after as before.

The load comes from another process (this file, run with --generate-load), which drives
all its connections from one thread through non-blocking sockets, with the requests
encoded beforehand, so that it takes little of the CPU it shares with the servers. Its
clients keep a connection open until the server closes it, as stock waitress does after
every 204, and then open another. In a closed loop, latency counts from sending. In an
open loop each request is due at a time fixed beforehand and its latency counts from then,
so that a slow server cannot hold the load back and hide its queue. Requests wait in the
client for one of at most 64 connections, so in the open loops a fleet's requests share
them as they would behind a proxy; devices with a connection each would hold many more.
A request is given up, and counted as an error, after waiting 2 s for a connection or 2 s
for its answer.

Other work on the machine takes CPU from the servers and moves every figure; the first
and the last line tell the load average.
"""

import argparse
import http.client
import http.server
import json
import math
import os
import pickle
import platform
import queue
import random
import re
import selectors
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from importlib.metadata import version
from itertools import count, pairwise
from pathlib import Path
from typing import NamedTuple

import connections
import fleet
import fleetmon
import upgrades
from simulator import PUBLISHED_DAYS, UPLOADS_A_DAY, simulated_day

HERE = Path(__file__).resolve().parent
FLEETMON_SCRIPT = HERE / "fleetmon.py"
BENCHMARK_SCRIPT = Path(__file__).resolve()
FLOOR_THREADS = connections.SETTINGS["threads"]

# What a device of the fleet sends in a day: a heartbeat a minute, the simulator's
# uploads, and a few reads of its stats by whoever watches it.
HEARTBEATS_PER_DAY = 24 * 60
# Every minute of an hour online: the bits 0-59 of an online_hours row.
FULL_HOUR = (1 << 60) - 1
READS_PER_DAY = 10
REQUESTS_PER_DEVICE_SECOND = (HEARTBEATS_PER_DAY + UPLOADS_A_DAY + READS_PER_DAY) / 86_400

FIRST_DAY = datetime(2024, 1, 1)  # UTC
FIRST_MINUTE = int(FIRST_DAY.replace(tzinfo=UTC).timestamp()) // 60  # fleetmon's minute of it
CLIENT_COUNTS = (16, 64)
# Requests encoded beforehand for each second of a closed-loop run: more than any server
# here answers. A run that used them all up would end early, its figures still right.
CLOSED_LOOP_MAX_RATE = 8_000
# A client gives up on a request that has waited this long for a connection to send it
# on, or for its answer once sent, and counts it as an error. A device would too: its
# next heartbeat is due within the minute. Without it, 30 s at 1.3 times capacity would
# leave 9 s of work queued. The answer gets the whole time from sending: a request sent
# just before giving up on it would only be work the server does for nobody.
GIVE_UP_SECONDS = 2.0
# Connections the open-loop client may keep at once; requests wait in its queue for one.
OPEN_LOOP_CONNECTIONS = 64
OVERLOAD = 1.3
AFTER_OVERLOAD = 0.3
OVERLOAD_FLEET = 100_000
# The latency fleetmon is held to: section 5 passes a fleet size whose p99 stays under
# it, with no error, and sections 7, 8 and 10 compare their p99 with it.
CLAIM_P99_SECONDS = 0.050

# Section 6: a device's day, a heartbeat a minute with every tenth minute missed and the
# simulator's uploads spread over it, sent by this many clients in a closed loop.
MISSED_EVERY = 10
STORAGE_CLIENTS = 16
YEAR_FLEET = 50_000
YEAR_KEEP_DAYS = 30
# Section 7: the backlog's uploads a device a day, what fleetmon keeps, the heartbeats a
# second while it prunes, and how long to go on watching once they have stopped.
BACKLOG_UPLOADS_A_DAY = 4
BACKLOG_UPLOAD_NS = 120 * 10**9
PRUNING_KEEP_DAYS = 7
PRUNING_RATE = 200
PRUNING_WATCH_AFTER_SECONDS = 120
# Section 8: devices beat every half second, so that each stays up with --down-after 1s;
# each of the flapping ones falls silent once, in turn, long enough to be declared down.
WEBHOOK_STEADY_DEVICES = 100
BEAT_SECONDS = 0.5
SILENT_SECONDS = 2.0
# Section 9.
DOWN_AFTER_SECONDS = 3
SIGNAL_WAIT_SECONDS = 15
# Section 10: a fleet of cameras, its mix, the heartbeats a second beside the tabs, and
# the tabs: each reloads its page this long after the last one came. The heartbeats
# alone, then beside four tabs of the plain page, then beside four filtered by what
# every camera's id contains, the most a filter can match.
NEVER_HEARD_SHARE = 0.03
DOWN_SHARE = 0.02
PAGE_HEARTBEAT_RATE = 500
# No tab first: what the heartbeats' latency is on this machine, then, beside it, the tabs'.
TAB_SETS = ((), ("/",) * 4, ("/?q=cam-",) * 4)
TAB_PAUSE_SECONDS = 0.5
BROWSER_ACCEPT = "text/html,application/xhtml+xml,*/*;q=0.8"
# Section 11: the first layout (schema version 0), a row per online minute and per upload,
# as the first fleetmon made it. Its triggers are made once the rows are in: the upgrade
# drops them by name.
FIRST_LAYOUT = upgrades.split_statements((upgrades.MIGRATIONS / "0.sql").read_text(encoding="utf-8"))
FIRST_LAYOUT_TABLES = [statement for statement in FIRST_LAYOUT if "CREATE TRIGGER" not in statement]
FIRST_LAYOUT_TRIGGERS = [statement for statement in FIRST_LAYOUT if "CREATE TRIGGER" in statement]
# One device in so many has sent nothing: no stats, before and after.
SILENT_EVERY = 100
# How often the upgrade's child process has its files and the disk looked at.
POLL_SECONDS = 0.1

LABEL_WIDTH = 46


@dataclass(frozen=True)
class Plan:
    """How long each section runs, and how large what it builds is."""

    rounds: int  # turns each server takes in sections 1 to 3
    closed_loop_seconds: float
    read_seconds: float
    capacity_seconds: float
    overload_seconds: int
    recovery_seconds: int
    fleet_sizes: tuple[int, ...]
    fleet_step_seconds: float
    storage_devices: int
    backlog_devices: int
    backlog_days: int
    pruning_seconds: float  # of heartbeats while it prunes
    flapping_devices: int
    webhook_seconds: float
    down_repeats: int
    page_devices: int
    page_requests: int  # of each kind, one after another
    page_load_seconds: float
    upgrade_devices: int
    upgrade_days: int  # of history each, in the first layout


FULL = Plan(
    rounds=3, closed_loop_seconds=3, read_seconds=2, capacity_seconds=3,
    overload_seconds=30, recovery_seconds=10,
    # The largest step offers more than the floor answers here.
    fleet_sizes=(25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000),
    fleet_step_seconds=30,
    storage_devices=40,
    backlog_devices=1_000, backlog_days=365, pruning_seconds=45,
    flapping_devices=100, webhook_seconds=30,
    down_repeats=5,
    page_devices=100_000, page_requests=20, page_load_seconds=30,
    # A fleet's four weeks in the first layout: about 1.2 GB.
    upgrade_devices=1_355, upgrade_days=28,
)
QUICK = Plan(
    rounds=1, closed_loop_seconds=1, read_seconds=1, capacity_seconds=1,
    overload_seconds=4, recovery_seconds=3,
    fleet_sizes=(25_000, 50_000), fleet_step_seconds=4,
    storage_devices=3,
    backlog_devices=100, backlog_days=30, pruning_seconds=5,
    flapping_devices=10, webhook_seconds=6,
    down_repeats=2,
    page_devices=20_000, page_requests=3, page_load_seconds=5,
    upgrade_devices=25, upgrade_days=28,
)


# --- Requests -----------------------------------------------------------------------


def http_request(method: str, path: str, body: dict | None = None, accept: str | None = None) -> bytes:
    """One HTTP/1.1 request as bytes, ready to send."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (f"Accept: {accept}\r\n" if accept else "")
    if body is None:
        return f"{head}\r\n".encode()
    data = json.dumps(body).encode()
    return f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


def sent_at(minute: int, second: int = 0, microsecond: int = 0) -> str:
    """RFC 3339 for a moment of a minute counted from FIRST_DAY."""
    # isoformat() of a naive UTC time is three times quicker than strftime(), which
    # matters for the hundreds of thousands of requests encoded beforehand.
    return (FIRST_DAY + timedelta(minutes=minute, seconds=second, microseconds=microsecond)).isoformat() + "Z"


def heartbeat(device_id: str, minute: int) -> bytes:
    return http_request("POST", f"/api/v1/devices/{device_id}/heartbeat", {"sent_at": sent_at(minute, 17)})


def upload(device_id: str, minute: int, upload_time_ns: int, second: int = 0, microsecond: int = 0) -> bytes:
    body = {"sent_at": sent_at(minute, second, microsecond), "upload_time": upload_time_ns}
    return http_request("POST", f"/api/v1/devices/{device_id}/stats", body)


def stats_read(device_id: str) -> bytes:
    return http_request("GET", f"/api/v1/devices/{device_id}/stats")


class FleetTraffic:
    """The requests a fleet sends, mixed in the proportions one device sends them a day.

    Heartbeats go round the devices in a fixed shuffled order, a device's k-th in its
    k-th minute, so that each stores a new row and, sent at the fleet's pace, each
    device sends one a minute. Uploads and reads go to devices drawn at random.
    """

    def __init__(self, device_ids: list[str]):
        self.rng = random.Random(0)
        self.devices = self.rng.sample(device_ids, len(device_ids))
        self.heartbeats_sent = 0

    def take(self, n: int) -> list[bytes]:
        requests = []
        for _ in range(n):
            draw = self.rng.randrange(HEARTBEATS_PER_DAY + UPLOADS_A_DAY + READS_PER_DAY)
            minute, position = divmod(self.heartbeats_sent, len(self.devices))
            if draw < HEARTBEATS_PER_DAY:
                requests.append(heartbeat(self.devices[position], minute))
                self.heartbeats_sent += 1
            elif draw < HEARTBEATS_PER_DAY + UPLOADS_A_DAY:
                device_id = self.rng.choice(self.devices)
                requests.append(upload(device_id, minute, self.rng.randrange(60, 300) * 10**9))
            else:
                requests.append(stats_read(self.rng.choice(self.devices)))
        return requests


def telemetry_scripts(kind: str, clients: int, seconds: float, minutes: Iterator[int]) -> list[list[bytes]]:
    """A list of heartbeats or uploads for each closed-loop client, spread over the
    simulator's devices, each in a minute of its own so that every one writes."""
    devices = list(PUBLISHED_DAYS)

    def request(client: int, i: int) -> bytes:
        device_id = devices[(client + i) % len(devices)]
        if kind == "heartbeat":
            return heartbeat(device_id, next(minutes))
        return upload(device_id, next(minutes), 187_893_379_134)

    per_client = math.ceil(CLOSED_LOOP_MAX_RATE * seconds / clients)
    return [[request(client, i) for i in range(per_client)] for client in range(clients)]


def paced(requests: list[bytes], rate: float, start: float = 0.0) -> list[tuple[float, bytes]]:
    """Each request with the time it is due, one every 1/rate seconds from start."""
    return [(start + i / rate, request) for i, request in enumerate(requests)]


def fleet_day(device_ids: list[str], heartbeats_only: bool = False) -> list[bytes]:
    """A day of a fleet in time order, a minute after another: in each, a heartbeat from
    every device but in every tenth minute, and its uploads, spread over the day, each
    with the fraction of a second the simulator sends."""
    rng = random.Random(0)
    upload_minutes = {number * HEARTBEATS_PER_DAY // UPLOADS_A_DAY for number in range(UPLOADS_A_DAY)}
    requests = []
    for minute in range(HEARTBEATS_PER_DAY):
        for device_id in device_ids:
            if minute % MISSED_EVERY != MISSED_EVERY - 1:
                requests.append(heartbeat(device_id, minute))
            if minute in upload_minutes and not heartbeats_only:
                requests.append(upload(device_id, minute, rng.randrange(30 * 10**9, 300 * 10**9),
                                       second=rng.randrange(60), microsecond=rng.randrange(1, 10**6)))
    return requests


# --- Load generator: runs in a process of its own -----------------------------------

# Why a request has no status: the client gave up on it before it had a connection to
# send it on, or while waiting for the answer (which the server may still work out),
# or the connection failed.
NEVER_SENT = "never sent"
GAVE_UP = "gave up"
CONNECTION_FAILED = "connection failed"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


class Connection:
    """A keep-alive HTTP/1.1 client connection on a non-blocking socket, one request at
    a time. A request sent after the server closed it opens it again.

    Every answer measured here has a Content-Length or, being a 204, no body at all.
    """

    def __init__(self, port: int, selector: selectors.BaseSelector):
        self.port = port
        self.selector = selector
        self.sock: socket.socket | None = None
        self.connecting = False
        self.busy = False
        self.unsent = b""
        self.received = bytearray()
        self.started = 0.0  # when the request was sent or, in an open loop, due
        self.source = 0  # which request it is (see Outcome)
        self.requests_sent = 0  # tells this request's deadline from an earlier one's
        self.opened = 0

    def send(self, request: bytes, started: float, source: int) -> None:
        self.busy, self.unsent, self.started, self.source = True, request, started, source
        self.requests_sent += 1
        self.received.clear()
        if self.sock is None:
            self._open()
        else:
            self._send_some()

    def on_ready(self) -> int | str | None:
        """Go on once the selector says the socket is ready: returns the status of the
        answer when it is complete, CONNECTION_FAILED if the request failed, else None."""
        if self.connecting:
            self.connecting = False
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return self._fail()
            return self._send_some()
        if self.unsent:
            return self._send_some()
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not self.busy:  # between requests all a server sends is its closing
            self.close()
            return None
        if not data:
            return self._fail()
        self.received += data
        return self._answer()

    def give_up(self) -> None:
        self.close()
        self.busy = False

    def close(self) -> None:
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def _open(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect_ex(("127.0.0.1", self.port))  # done when the socket is writable
        self.selector.register(self.sock, selectors.EVENT_WRITE, self)
        self.connecting = True
        self.opened += 1

    def _send_some(self) -> str | None:
        try:
            sent = self.sock.send(self.unsent)
        except BlockingIOError:
            sent = 0
        except OSError:
            return self._fail()
        self.unsent = self.unsent[sent:]
        # Once all is sent, watch for the answer (and between requests, for a close).
        events = selectors.EVENT_WRITE if self.unsent else selectors.EVENT_READ
        self.selector.modify(self.sock, events, self)
        return None

    def _answer(self) -> int | None:
        end = self.received.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.received[:end]).lower()
        length = CONTENT_LENGTH.search(head)
        if len(self.received) < end + 4 + (int(length.group(1)) if length else 0):
            return None
        self.busy = False
        if b"\r\nconnection: close" in head:
            self.close()
        return int(head[9:12])

    def _fail(self) -> str:
        self.give_up()
        return CONNECTION_FAILED


class Outcome(NamedTuple):
    """What became of one request."""

    at: float  # when it was sent (closed loop) or due (open loop), in seconds from the start
    latency: float | None  # None if the client gave up on it
    status: int | str  # the answer's status, or why it has none
    # Which request it was: in an open loop its index in the schedule, the tabs' requests
    # numbered after the schedule's, tab by tab; in a closed loop the client's number.
    source: int


@dataclass
class LoadResult:
    outcomes: list[Outcome]
    seconds: float  # from the start to the last answer, or to the end of a timed run
    connections_opened: int


class LoadGenerator:
    """Connections on one selector, and the outcome of every request they sent."""

    def __init__(self, port: int):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []
        self.outcomes: list[Outcome] = []
        self.in_flight = 0
        # (when to give up, connection, its request's number), in the order sent,
        # which is also the order of the deadlines.
        self.deadlines: deque[tuple[float, Connection, int]] = deque()
        self.start = time.perf_counter()

    def new_connection(self) -> Connection:
        connection = Connection(self.port, self.selector)
        self.connections.append(connection)
        return connection

    def send(self, connection: Connection, request: bytes, started: float, source: int) -> None:
        connection.send(request, started, source)
        self.in_flight += 1
        deadline = time.perf_counter() + GIVE_UP_SECONDS
        self.deadlines.append((deadline, connection, connection.requests_sent))

    def record(self, started: float, answered: float | None, status: int | str, source: int) -> None:
        latency = None if answered is None else answered - started
        self.outcomes.append(Outcome(started - self.start, latency, status, source))

    def wait(self, until: float) -> tuple[list[Connection], float]:
        """Wait for sockets until `until` at the latest. Records the answers and the
        requests given up; returns the connections that became free, and the time."""
        wake = min(until, self.deadlines[0][0]) if self.deadlines else until
        events = self.selector.select(max(0.0, wake - time.perf_counter()))
        now = time.perf_counter()
        free = []
        for key, _ in events:
            connection = key.data
            status = connection.on_ready()
            if status is not None:
                self.record(connection.started, now, status, connection.source)
                free.append(connection)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, connection, number = self.deadlines.popleft()
            if connection.busy and connection.requests_sent == number:
                connection.give_up()
                self.record(connection.started, None, GAVE_UP, connection.source)
                free.append(connection)
        self.in_flight -= len(free)
        return free, now

    def result(self, end: float) -> LoadResult:
        for connection in self.connections:
            connection.close()
        self.selector.close()
        opened = sum(connection.opened for connection in self.connections)
        return LoadResult(self.outcomes, end - self.start, opened)


@dataclass
class ClosedLoop:
    """Each client sends its script's requests one after another, each as soon as the
    last is answered, until the scripts end or `seconds` (if given) have passed."""

    port: int
    scripts: list[list[bytes]]
    seconds: float | None = None

    def run(self) -> LoadResult:
        load = LoadGenerator(self.port)
        end = math.inf if self.seconds is None else load.start + self.seconds
        clients = {load.new_connection(): (number, iter(script)) for number, script in enumerate(self.scripts)}

        def send_next(connection: Connection) -> None:
            number, script = clients[connection]
            request = next(script, None)
            if request is not None:
                load.send(connection, request, time.perf_counter(), number)

        for connection in clients:
            send_next(connection)
        now = load.start
        while load.in_flight and now < end:
            free, now = load.wait(until=end)
            for connection in free:
                send_next(connection)
        return load.result(end=min(now, end))


@dataclass
class OpenLoop:
    """Send each request of the schedule when it is due, on a free connection, opening
    up to `connections`; requests with none free wait their turn, first due first.

    Beside them, browser tabs, each on a connection of its own, as the page's script does
    it: ask for the page, wait for it, pause, ask again, until the schedule's last
    request is due.
    """

    port: int
    schedule: list[tuple[float, bytes]]  # (seconds from the start when due, request)
    connections: int = OPEN_LOOP_CONNECTIONS
    tabs: tuple[bytes, ...] = ()
    tab_pause: float = 0.0

    def run(self) -> LoadResult:
        load = LoadGenerator(self.port)
        idle: list[Connection] = []  # the last one freed is used first
        opened = 0
        waiting: deque[tuple[float, bytes, int]] = deque()
        upcoming = iter((load.start + due, request, index) for index, (due, request) in enumerate(self.schedule))
        next_due = next(upcoming, None)
        end = load.start + (self.schedule[-1][0] if self.schedule else 0.0)
        tabs = {load.new_connection(): (len(self.schedule) + number, request)
                for number, request in enumerate(self.tabs)}
        tab_due = dict.fromkeys(tabs, load.start)  # when each asks next; inf while it waits
        now = load.start
        while next_due or waiting or load.in_flight:
            while next_due and next_due[0] <= now:
                waiting.append(next_due)
                next_due = next(upcoming, None)
            while waiting and waiting[0][0] + GIVE_UP_SECONDS <= now:
                due, _, index = waiting.popleft()
                load.record(due, None, NEVER_SENT, index)
            while waiting and (idle or opened < self.connections):
                if not idle:
                    idle.append(load.new_connection())
                    opened += 1
                due, request, index = waiting.popleft()
                load.send(idle.pop(), request, due, index)
            for tab, due in tab_due.items():
                if due <= now:
                    if now < end:
                        source, request = tabs[tab]
                        load.send(tab, request, now, source)
                    tab_due[tab] = math.inf
            free, now = load.wait(until=min([next_due[0] if next_due else now + 0.1, *tab_due.values()]))
            for connection in free:
                if connection in tabs:
                    tab_due[connection] = now + self.tab_pause
                else:
                    idle.append(connection)
        return load.result(end=now)


def generate_load(job: ClosedLoop | OpenLoop) -> LoadResult:
    """Run a load job in a new process of its own, so that it has its own GIL."""
    command = [sys.executable, str(BENCHMARK_SCRIPT), "--generate-load"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
        output, _ = process.communicate(pickle.dumps(job))
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed with exit code {process.returncode}")
    return pickle.loads(output)


def serve_load_job() -> None:
    """The load generator's process: a job from stdin, its result to stdout."""
    job = pickle.load(sys.stdin.buffer)
    pickle.dump(job.run(), sys.stdout.buffer)


# --- Figures ------------------------------------------------------------------------


@dataclass
class Figures:
    rate: float  # successful answers a second
    p50: float  # seconds; inf when more than half were given up on
    p99: float
    errors: int  # answers other than 2xx, failed connections, requests given up on
    connections_per_request: float


def succeeded(status: int | str) -> bool:
    return isinstance(status, int) and 200 <= status < 300


def percentile(latencies: list[float | None], fraction: float) -> float:
    """Nearest rank; a request given up on counts as slower than any answer."""
    ordered = sorted(math.inf if latency is None else latency for latency in latencies)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] if ordered else math.nan


def figures_of(job: ClosedLoop | OpenLoop) -> Figures:
    return figures(generate_load(job))


def figures(result: LoadResult) -> Figures:
    latencies = [outcome.latency for outcome in result.outcomes]
    answered = sum(succeeded(outcome.status) for outcome in result.outcomes)
    return Figures(
        rate=answered / result.seconds,
        p50=percentile(latencies, 0.50),
        p99=percentile(latencies, 0.99),
        errors=len(result.outcomes) - answered,
        connections_per_request=result.connections_opened / max(1, len(result.outcomes)),
    )


def median_figures(rounds: list[Figures]) -> Figures:
    """The median of each figure over the rounds; errors added up, so none hides."""
    return Figures(
        rate=statistics.median(f.rate for f in rounds),
        p50=statistics.median(f.p50 for f in rounds),
        p99=statistics.median(f.p99 for f in rounds),
        errors=sum(f.errors for f in rounds),
        connections_per_request=statistics.median(f.connections_per_request for f in rounds),
    )


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "none"
    return "gave up" if seconds == math.inf else f"{seconds * 1000:,.2f} ms"


def latencies_line(outcomes: list[Outcome]) -> str:
    """p50, p99 and the slowest of some requests, and how many failed."""
    latencies = [outcome.latency for outcome in outcomes]
    errors = sum(not succeeded(outcome.status) for outcome in outcomes)
    return (f"{len(outcomes):,} requests, p50 {ms(percentile(latencies, 0.5))}, p99 {ms(percentile(latencies, 0.99))}, "
            f"slowest {ms(percentile(latencies, 1.0))}, errors {errors:,}")


def against_claim(outcomes: list[Outcome]) -> str:
    p99 = percentile([outcome.latency for outcome in outcomes], 0.99)
    verdict = "under" if p99 < CLAIM_P99_SECONDS else "OVER"
    return f"p99 {verdict} {CLAIM_P99_SECONDS * 1000:.0f} ms"


def print_header(first: str = "req/s") -> None:
    print(f"  {'':<{LABEL_WIDTH}}{first:>9}{'p50':>12}{'p99':>12}{'errors':>8}{'connects/request':>18}")


def print_row(label: str, f: Figures) -> None:
    print(f"  {label:<{LABEL_WIDTH}}{f.rate:>9,.0f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}"
          f"{f.connections_per_request:>18.2f}")


def paired_ratio(ours: list[Figures], theirs: list[Figures], figure: str) -> float:
    """One measurement's figure over another's: the median of the rounds' ratios. They
    ran side by side in each round, so a slower spell of the machine, which both runs of
    a round share, cancels out, as it does not in a ratio of medians. A round where the
    other answered nothing counts as infinitely better for ours."""
    ratios = [getattr(o, figure) / getattr(t, figure) if getattr(t, figure) else math.inf
              for o, t in zip(ours, theirs)]
    return statistics.median(ratios)


def print_ratios(label: str, ours: list[Figures], theirs: list[Figures]) -> None:
    """Throughput and p99 of one measurement over another's, under their columns."""
    print(f"  {label:<{LABEL_WIDTH}}{paired_ratio(ours, theirs, 'rate'):>8.2f}x{'':>12}"
          f"{paired_ratio(ours, theirs, 'p99'):>11.2f}x")


def in_turns(runs: dict[str, Callable[[], Figures]], rounds: int) -> dict[str, list[Figures]]:
    """Run each measurement in turn, round after round, every other round in reverse
    order; the figures of every round. Taking turns spreads whatever else the machine
    does over all of them alike, and none is always the one that runs first."""
    results = {name: [] for name in runs}
    for number in range(rounds):
        for name, run in (reversed(runs.items()) if number % 2 else runs.items()):
            results[name].append(run())
    return results


def load_average() -> str:
    return f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average unknown"


# --- Servers ------------------------------------------------------------------------

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
# What a server prints when something went wrong that the figures would not show.
TROUBLE = ("Traceback", " failed: ")


@contextmanager
def server_process(workdir: Path, name: str, args: list[str]) -> Iterator[int]:
    """Run Python with args; yield the port from the line it prints once listening.

    Its output goes to a file rather than a pipe, which would fill up unread and stop it.
    Once it is stopped, the first lines of trouble it printed, if any, are shown.
    """
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=f"{name}-", suffix=".log", delete=False) as log:
        process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield wait_for_port(process, Path(log.name))
    finally:
        process.kill()
        process.wait()
        trouble = [line for line in Path(log.name).read_text(errors="replace").splitlines()
                   if any(sign in line for sign in TROUBLE)]
        for line in trouble[:3]:
            print(f"  ({name} said: {line.strip()})")


def wait_for_port(process: subprocess.Popen, log: Path, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        printed = log.read_text(errors="replace")
        if match := LISTENING.search(printed):
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"a server stopped before listening:\n{printed}")
        time.sleep(0.05)
    raise RuntimeError(f"a server was not listening after {seconds} s")


def fleetmon_server(workdir: Path, database: Path, devices_csv: Path, *options: str,
                    script: Path = FLEETMON_SCRIPT):
    """fleetmon, today's or (with script) an earlier one, which takes the same start line."""
    args = [str(script), "--port", "0", "--db", str(database), "--devices", str(devices_csv), *options]
    return server_process(workdir, "fleetmon" if script == FLEETMON_SCRIPT else "earlier fleetmon", args)


@contextmanager
def fleetmon_with_lines(database: Path, devices_csv: Path, *options: str) -> Iterator[tuple[int, queue.Queue]]:
    """fleetmon with every line it prints put on a queue, with the time it came, as soon
    as it comes; yields its port and the queue."""
    args = [str(FLEETMON_SCRIPT), "--port", "0", "--db", str(database), "--devices", str(devices_csv), *options]
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    lines: queue.Queue[tuple[float, str]] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, name="fleetmon's lines")
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while (match := LISTENING.search(lines.get(timeout=max(0.0, deadline - time.monotonic()))[1])) is None:
            pass
        yield int(match.group(1)), lines
    finally:
        process.kill()
        process.wait()
        reader.join()
        process.stdout.close()


def earlier_label(against: Path) -> str:
    """The earlier fleetmon's folder, and its commit if it is a git checkout."""
    commit = subprocess.run(["git", "-C", str(against), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()
    return f"{against}" + (f" at commit {commit}" if commit else "")


def floor_server(workdir: Path):
    return server_process(workdir, "floor", [str(BENCHMARK_SCRIPT), "--serve-floor", str(FLOOR_THREADS)])


def serve_floor(threads: int) -> None:
    """The floor: Flask on stock waitress, parsing the JSON body and answering 204."""
    import logging

    import waitress
    from flask import Flask, request

    app = Flask("floor")

    @app.post("/api/v1/devices/<device_id>/<kind>")
    def accept(device_id: str, kind: str):
        json.loads(request.get_data())
        return "", 204

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as fleetmon does
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=threads)
    print(f"floor: listening on http://127.0.0.1:{server.effective_port}", flush=True)
    server.run()


def timed_get(connection: http.client.HTTPConnection, path: str, accept: str) -> tuple[int, int, float]:
    """GET path on a kept connection: status, bytes of the body, seconds taken."""
    started = time.perf_counter()
    connection.request("GET", path, headers={"Accept": accept})
    response = connection.getresponse()
    body = response.read()
    return response.status, len(body), time.perf_counter() - started


def post_heartbeat(port: int, device_id: str, minute: int) -> tuple[float, float]:
    """One heartbeat on a new connection: when it was sent and when it was answered
    (time.monotonic()). Raises RuntimeError unless it is stored."""
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as connection:
        connection.connect()
        sent = time.monotonic()
        connection.request("POST", f"/api/v1/devices/{device_id}/heartbeat",
                           body=json.dumps({"sent_at": sent_at(minute, 17)}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        answered = time.monotonic()
    if response.status != 204:
        raise RuntimeError(f"a heartbeat was answered {response.status}")
    return sent, answered


# --- Databases ----------------------------------------------------------------------


def fleet_ids(n: int) -> list[str]:
    """n device ids shaped like the simulator's, which are MAC addresses."""
    return ["02-00-" + "-".join(f"{byte:02x}" for byte in i.to_bytes(4, "big")) for i in range(n)]


def write_devices_csv(path: Path, device_ids: list[str]) -> Path:
    path.write_text("device_id\n" + "\n".join(device_ids) + "\n", encoding="utf-8")
    return path


def new_database(workdir: Path, name: str, devices_csv: Path, script: Path = FLEETMON_SCRIPT) -> Path:
    """A database with fleetmon's schema and its rows for the devices: fleetmon makes
    them when it starts, and is stopped once listening."""
    database = workdir / f"{name}.db"
    with fleetmon_server(workdir, database, devices_csv, script=script):
        pass
    checkpoint(database)
    return database


def checkpoint(database: Path) -> int:
    """Move the write-ahead log into the database; returns the database's size in bytes."""
    with closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = database.with_name(database.name + "-wal")
    return database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def bytes_by_table(database: Path) -> Counter[str]:
    """The bytes of the database's pages by the table each belongs to (an index's, to its
    table), and its free pages under "free"; together, the file's size."""
    with closing(sqlite3.connect(database)) as db:
        sizes = Counter(dict(db.execute(
            "SELECT coalesce(tbl_name, dbstat.name), sum(pgsize) FROM dbstat"
            " LEFT JOIN sqlite_schema USING (name) GROUP BY 1").fetchall()))
        sizes["free"] = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
    return sizes


@contextmanager
def bulk_load(database: Path) -> Iterator[sqlite3.Connection]:
    """A connection that writes straight into a database no server has open, in one
    transaction, without a journal: a database built here is thrown away if the build
    fails. The write-ahead log comes back on at the end, as fleetmon keeps it."""
    with closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        yield db
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")


def device_keys(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT device_id, device_key FROM devices").fetchall())


def store_online_minutes(database: Path, device_id: str, minutes: int) -> None:
    """Give a device `minutes` online minutes in a row from FIRST_DAY, straight into
    the tables: its rows of full hours (the last one partly full) and its aggregates."""
    full_hours, rest = divmod(minutes, 60)
    hours = [(FIRST_MINUTE // 60 + hour, FULL_HOUR) for hour in range(full_hours)]
    if rest:
        hours.append((FIRST_MINUTE // 60 + full_hours, (1 << rest) - 1))
    last_minute = FIRST_MINUTE + minutes - 1
    with bulk_load(database) as db:
        key = device_keys(db)[device_id]
        db.executemany("INSERT INTO online_hours (device_key, hour, minutes) VALUES (?, ?, ?)",
                       ((key, hour, bits) for hour, bits in hours))
        db.execute("UPDATE devices SET online_minutes = ?, first_minute = ?, last_minute = ?, newest_minute = ?"
                   " WHERE device_key = ?", (minutes, FIRST_MINUTE, last_minute, last_minute, key))


def build_backlog(database: Path, days: int) -> tuple[int, int]:
    """Give every device of the database `days` days of history ending where FIRST_DAY
    begins, straight into the tables: a full hour a row, BACKLOG_UPLOADS_A_DAY uploads a
    day, and the aggregates to match, heard just now. Returns the rows of each."""
    first_hour = FIRST_MINUTE // 60 - days * 24
    uploads = days * BACKLOG_UPLOADS_A_DAY
    with bulk_load(database) as db:
        # CROSS JOIN keeps the devices outside, so that the rows come in key order.
        hours = db.execute(
            "INSERT INTO online_hours (device_key, hour, minutes)"
            " WITH RECURSIVE hours (hour) AS (SELECT :first UNION ALL SELECT hour + 1 FROM hours WHERE hour < :last)"
            " SELECT device_key, hour, :full FROM devices CROSS JOIN hours",
            {"first": first_hour, "last": FIRST_MINUTE // 60 - 1, "full": FULL_HOUR}).rowcount
        uploaded = db.execute(
            "INSERT INTO uploads (device_key, number, sent_at, upload_time_ns)"
            " WITH RECURSIVE numbers (number) AS (SELECT 1 UNION ALL SELECT number + 1 FROM numbers WHERE number < :n)"
            " SELECT device_key, number, :start + (number - 1) * :every, :ns FROM devices CROSS JOIN numbers",
            {"n": uploads, "start": first_hour * 3600 + 17, "every": 86_400 // BACKLOG_UPLOADS_A_DAY,
             "ns": BACKLOG_UPLOAD_NS}).rowcount
        db.execute(
            "UPDATE devices SET online_minutes = :minutes, first_minute = :first, last_minute = :last,"
            " newest_minute = :last, upload_count = :uploads, upload_total_ns = :uploads * :ns, last_heard_ms = :now",
            {"minutes": days * 24 * 60, "first": first_hour * 60, "last": FIRST_MINUTE - 1, "uploads": uploads,
             "ns": BACKLOG_UPLOAD_NS, "now": time.time_ns() // 1_000_000})
    return hours, uploaded


def build_fleet(database: Path, now_ms: int) -> tuple[Counter[str], list[str]]:
    """Give the database's devices a day of varied telemetry up to now, straight into
    the tables: most heard within the last minute, some down for minutes to days, some
    never heard; their hours full, partly online or missing; a few uploads each; and
    the aggregates to match. Returns how many are up, down and never heard, and the
    ids of those that are up."""
    rng = random.Random(0)
    # Partly online hours, most of their minutes set.
    patterns = [sum(1 << minute for minute in range(60) if rng.random() < share)
                for share in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98) for _ in range(10)]
    counts, up = Counter(), []
    hours, uploads, devices, outages = [], [], [], []

    def flush() -> None:
        db.executemany("INSERT INTO online_hours (device_key, hour, minutes) VALUES (?, ?, ?)", hours)
        db.executemany("INSERT INTO uploads (device_key, number, sent_at, upload_time_ns) VALUES (?, ?, ?, ?)", uploads)
        hours.clear()
        uploads.clear()

    with bulk_load(database) as db:
        for device_id, key in sorted(device_keys(db).items(), key=lambda item: item[1]):
            draw = rng.random()
            if draw < NEVER_HEARD_SHARE:
                counts["never"] += 1
                continue
            if draw < NEVER_HEARD_SHARE + DOWN_SHARE:
                last_heard = now_ms - rng.randrange(10 * 60_000, 3 * 86_400_000)
                down_since = last_heard
                outages.append((key, down_since))
                counts["down"] += 1
            else:
                last_heard = now_ms - rng.randrange(60_000)
                down_since = None
                counts["up"] += 1
                up.append(device_id)
            end = last_heard // 60_000
            online, first, last = 0, None, None
            for hour in range(end // 60 - 23, end // 60 + 1):
                draw = rng.random()
                if draw < 0.08:
                    continue  # an hour offline
                bits = FULL_HOUR if draw < 0.85 else rng.choice(patterns)
                if hour == end // 60:
                    bits &= (1 << (end % 60 + 1)) - 1
                if bits:
                    hours.append((key, hour, bits))
                    online += bits.bit_count()
                    if first is None:
                        first = hour * 60 + (bits & -bits).bit_length() - 1
                    last = hour * 60 + bits.bit_length() - 1
            upload_minutes = sorted(rng.randrange(end - 1439, end + 1) for _ in range(rng.randrange(9)))
            upload_times = [rng.randrange(30 * 10**9, 300 * 10**9) for _ in upload_minutes]
            uploads.extend((key, number, minute * 60 + rng.randrange(60), upload_time)
                           for number, (minute, upload_time) in enumerate(zip(upload_minutes, upload_times), 1))
            newest = max(minute for minute in (last, *upload_minutes) if minute is not None) \
                if last is not None or upload_minutes else None
            devices.append((online, first, last, len(upload_times), sum(upload_times), newest, last_heard, down_since,
                            key))
            if len(hours) > 100_000:
                flush()
        flush()
        db.executemany("UPDATE devices SET online_minutes = ?, first_minute = ?, last_minute = ?, upload_count = ?,"
                       " upload_total_ns = ?, newest_minute = ?, last_heard_ms = ?, down_since_ms = ?"
                       " WHERE device_key = ?", devices)
        db.executemany("INSERT INTO outages (device_key, started_ms) VALUES (?, ?)", outages)
    return counts, up


def build_first_layout(database: Path, device_ids: list[str], days: int) -> tuple[int, int]:
    """A database of the first layout, built straight with SQL: for each device but one in
    SILENT_EVERY, `days` days of a heartbeat a minute from FIRST_DAY with every tenth
    minute missed (which one, device by device), and the simulator's uploads a day, sent
    in time order; device_stats to match, from one GROUP BY. Returns the rows of each."""
    arguments = {"first": FIRST_MINUTE, "minutes": days * HEARTBEATS_PER_DAY, "uploads": days * UPLOADS_A_DAY,
                 "every": MISSED_EVERY, "silent": SILENT_EVERY}
    with bulk_load(database) as db:
        for statement in FIRST_LAYOUT_TABLES:
            db.execute(statement)
        # Numbered in id order, the heartbeats' key order: each goes in at the end, and the
        # pages fill, where a file that took them a minute at a time has them part full.
        db.execute("CREATE TEMP TABLE numbered (number INTEGER PRIMARY KEY, device_id TEXT NOT NULL)")
        db.executemany("INSERT INTO numbered VALUES (?, ?)", enumerate(sorted(device_ids)))
        db.execute("INSERT INTO listed_devices SELECT device_id FROM numbered")
        heartbeats = db.execute(
            "INSERT INTO heartbeat_minutes (device_id, minute)"
            " WITH RECURSIVE offsets (offset) AS (SELECT 0 UNION ALL SELECT offset + 1 FROM offsets"
            "                                     WHERE offset < :minutes - 1)"
            " SELECT device_id, :first + offset FROM numbered CROSS JOIN offsets"
            " WHERE number % :silent != 1 AND (offset + number) % :every != :every - 1", arguments).rowcount
        # Spread over each day, at a second of their minute, of 30 s to 5 min each.
        uploads = db.execute(
            "INSERT INTO uploads (device_id, sent_at, upload_time_ns)"
            " WITH RECURSIVE numbers (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM numbers WHERE n < :uploads - 1)"
            " SELECT device_id,"
            "        strftime('%Y-%m-%dT%H:%M:%SZ', (:first + n * :minutes / :uploads) * 60 + (n + number) % 60,"
            "                 'unixepoch'),"
            "        30000000000 + (n * 7919 + number * 104729) * 1000003 % 270000000000"
            " FROM numbers CROSS JOIN numbered WHERE number % :silent != 1", arguments).rowcount
        db.execute(
            "INSERT INTO device_stats (device_id, online_minutes, first_minute, last_minute, upload_count,"
            "                          upload_total_ns)"
            " SELECT device_id, coalesce(online, 0), first, last, coalesce(sent, 0), coalesce(total, 0) FROM numbered"
            " LEFT JOIN (SELECT device_id, count(*) AS online, min(minute) AS first, max(minute) AS last"
            "            FROM heartbeat_minutes GROUP BY device_id) USING (device_id)"
            " LEFT JOIN (SELECT device_id, count(*) AS sent, sum(upload_time_ns) AS total"
            "            FROM uploads GROUP BY device_id) USING (device_id)")
        for statement in FIRST_LAYOUT_TRIGGERS:
            db.execute(statement)
    return heartbeats, uploads


# --- Sections -------------------------------------------------------------------------


def telemetry_run(port: int, kind: str, clients: int, seconds: float, minutes: Iterator[int]) -> Figures:
    return figures_of(ClosedLoop(port, telemetry_scripts(kind, clients, seconds, minutes), seconds))


def closed_loop_section(plan: Plan, workdir: Path, against: Path | None) -> None:
    names = ["fleetmon"] + (["earlier"] if against else []) + ["floor"]
    print(f"\n1. Closed loop: each client POSTs again as soon as it is answered; {plan.closed_loop_seconds:g} s "
          f"a run, median of {plan.rounds} rounds, {', '.join(names)} taking turns; a ratio is the median of "
          "the rounds' ratios")
    print_header()
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    servers = {"fleetmon": fleetmon_server(workdir, workdir / "closed-loop.db", devices_csv)}
    if against:
        servers["earlier"] = fleetmon_server(workdir, workdir / "closed-loop-earlier.db", devices_csv,
                                             script=against / "fleetmon.py")
    servers["floor"] = floor_server(workdir)
    # Shared, so that every heartbeat of every run stores a new row; counted back from
    # FIRST_DAY, as fleetmon refuses telemetry more than a day ahead of its clock, where
    # the minutes of many rounds counted forward would reach.
    minutes = count(0, -1)
    rates = {}
    with ExitStack() as stack:
        ports = {name: stack.enter_context(server) for name, server in servers.items()}
        for kind in ("heartbeat", "upload"):
            for clients in CLIENT_COUNTS:
                results = in_turns({
                    name: partial(telemetry_run, port, kind, clients, plan.closed_loop_seconds, minutes)
                    for name, port in ports.items()
                }, plan.rounds)
                what = f"POST {kind}, {clients} clients, "
                for number, (name, rounds) in enumerate(results.items()):
                    print_row((what if number == 0 else " " * len(what)) + name, median_figures(rounds))
                    rates[kind, clients, name] = median_figures(rounds).rate
                for name in names[1:]:
                    print_ratios(" " * len(what) + f"fleetmon/{name}", results["fleetmon"], results[name])
    low, high = CLIENT_COUNTS
    for kind in ("heartbeat", "upload"):
        # A server that answered nothing with fewer clients shows inf, as in paired_ratio.
        print(f"  throughput at {high} clients over {low}, POST {kind}: " + ", ".join(
            f"{name} {rates[kind, high, name] / rates[kind, low, name] if rates[kind, low, name] else math.inf:.2f}x"
            for name in names))


def burst_section(plan: Plan, workdir: Path, against: Path | None) -> None:
    # Each device's day as simulator.py sends it, in order, from a client of its own.
    scripts = [[http_request("POST", event.path, event.body) for event in simulated_day(device_id)]
               for device_id in PUBLISHED_DAYS]
    requests = sum(map(len, scripts))
    print(f"\n2. The simulator's burst: {requests:,} requests from {len(scripts)} clients at once, "
          f"each server fresh with a new database; median of {plan.rounds} rounds, a ratio the median of "
          "the rounds' ratios")
    print_header(first="seconds")
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    databases = (workdir / f"burst-{n}.db" for n in count())

    def burst(new_server: Callable) -> Figures:
        with new_server() as port:
            return figures(generate_load(ClosedLoop(port, scripts)))

    new_servers = {"fleetmon": lambda: fleetmon_server(workdir, next(databases), devices_csv)}
    if against:
        new_servers["earlier"] = lambda: fleetmon_server(workdir, next(databases), devices_csv,
                                                         script=against / "fleetmon.py")
    new_servers["floor"] = lambda: floor_server(workdir)
    results = in_turns({name: partial(burst, new_server) for name, new_server in new_servers.items()}, plan.rounds)
    for name, rounds in results.items():
        f = median_figures(rounds)
        print(f"  {name:<{LABEL_WIDTH}}{requests / f.rate:>9.2f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}"
              f"{f.connections_per_request:>18.2f}")
    for name in list(results)[1:]:
        # Seconds over seconds: the other's rate over fleetmon's.
        print(f"  {'fleetmon/' + name:<{LABEL_WIDTH}}{paired_ratio(results[name], results['fleetmon'], 'rate'):>8.2f}x")


def stats_read_section(plan: Plan, workdir: Path) -> None:
    print(f"\n3. GET stats from one client: {plan.read_seconds:g} s a run, median of {plan.rounds} rounds, "
          "the two servers taking turns; a ratio is the median of the rounds' ratios")
    print_header()
    device_id = next(iter(PUBLISHED_DAYS))
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    script = [[stats_read(device_id)] * math.ceil(CLOSED_LOOP_MAX_RATE * plan.read_seconds)]
    servers = {}
    for stored in (1_000, 1_000_000):
        database = new_database(workdir, f"stored-{stored}", devices_csv)
        store_online_minutes(database, device_id, stored)
        servers[f"{stored:,} online minutes stored"] = fleetmon_server(workdir, database, devices_csv)
    (few_name, few_server), (many_name, many_server) = servers.items()
    with few_server as few_port, many_server as many_port:
        results = in_turns({
            name: partial(figures_of, ClosedLoop(port, script, plan.read_seconds))
            for name, port in ((few_name, few_port), (many_name, many_port))
        }, plan.rounds)
    for name, rounds in results.items():
        print_row(name, median_figures(rounds))
    print_ratios("a million over a thousand", results[many_name], results[few_name])


def overload_section(plan: Plan, workdir: Path) -> None:
    print(f"\n4. Overload: the mix of requests of {OVERLOAD_FLEET:,} devices. Capacity in a closed loop, then "
          f"{OVERLOAD}x that paced for {plan.overload_seconds} s, then {AFTER_OVERLOAD}x for "
          f"{plan.recovery_seconds} s; latency from when each request was due")
    device_ids = fleet_ids(OVERLOAD_FLEET)
    devices_csv = write_devices_csv(workdir / "overload.csv", device_ids)
    database = new_database(workdir, "overload", devices_csv)
    traffic = FleetTraffic(device_ids)
    with fleetmon_server(workdir, database, devices_csv) as port:
        capacities = {}
        for clients in CLIENT_COUNTS:
            per_client = math.ceil(CLOSED_LOOP_MAX_RATE * plan.capacity_seconds / clients)
            scripts = [traffic.take(per_client) for _ in range(clients)]
            capacities[clients] = figures_of(ClosedLoop(port, scripts, plan.capacity_seconds)).rate
        capacity = max(capacities.values())
        print(f"  capacity {capacity:,.0f} req/s, the best closed loop of " +
              ", ".join(f"{clients} clients {rate:,.0f}" for clients, rate in capacities.items()))
        high, low = OVERLOAD * capacity, AFTER_OVERLOAD * capacity
        overload = paced(traffic.take(round(high * plan.overload_seconds)), high)
        recovery = paced(traffic.take(round(low * plan.recovery_seconds)), low, start=plan.overload_seconds)
        result = generate_load(OpenLoop(port, overload + recovery))

    during = [outcome for outcome in result.outcomes if outcome.at < plan.overload_seconds]
    answered = sum(succeeded(o.status) and o.at + o.latency < plan.overload_seconds for o in during)
    never_sent = sum(o.status == NEVER_SENT for o in during)
    given_up = sum(o.status == GAVE_UP for o in during)
    failed = sum(not succeeded(o.status) for o in during) - never_sent - given_up
    latencies = [o.latency for o in during]
    print(f"  during the overload: {answered / plan.overload_seconds:,.0f} answers/s = "
          f"{answered / plan.overload_seconds / capacity:.2f}x capacity; p50 {ms(percentile(latencies, 0.5))}, "
          f"p99 {ms(percentile(latencies, 0.99))}; errors {failed:,}")
    print(f"  of its {len(during):,} requests {never_sent + given_up:,} were given up after {GIVE_UP_SECONDS:g} s: "
          f"{never_sent:,} before a connection was free, {given_up:,} waiting for the answer")
    print("  after it, p99 of the requests due in each second:")
    for second in range(plan.recovery_seconds):
        start = plan.overload_seconds + second
        latencies = [o.latency for o in result.outcomes if start <= o.at < start + 1]
        given_up = sum(latency is None for latency in latencies)
        print(f"    {second:2d}-{second + 1:2d} s{ms(percentile(latencies, 0.99)):>12}   "
              f"given up {given_up:,} of {len(latencies):,}")


def fleet_size_section(plan: Plan, workdir: Path) -> None:
    print(f"\n5. How many devices: what N devices send ({HEARTBEATS_PER_DAY:,} heartbeats, {UPLOADS_A_DAY} uploads "
          f"and {READS_PER_DAY} stats reads a device a day), paced for {plan.fleet_step_seconds:g} s over at most "
          f"{OPEN_LOOP_CONNECTIONS} connections;")
    print(f"   a fleet passes with p99 under {CLAIM_P99_SECONDS * 1000:.0f} ms from when each request was due, "
          "and no error (what a device-day stores: section 6)")
    print(f"  {'devices':>9}{'offered/s':>11}{'answered/s':>12}{'p50':>12}{'p99':>12}{'errors':>8}")
    largest = None
    for devices in plan.fleet_sizes:
        rate = devices * REQUESTS_PER_DEVICE_SECOND
        device_ids = fleet_ids(devices)
        devices_csv = write_devices_csv(workdir / f"fleet-{devices}.csv", device_ids)
        database = new_database(workdir, f"fleet-{devices}", devices_csv)
        schedule = paced(FleetTraffic(device_ids).take(round(rate * plan.fleet_step_seconds)), rate)
        with fleetmon_server(workdir, database, devices_csv) as port:
            f = figures_of(OpenLoop(port, schedule))
        passed = f.p99 < CLAIM_P99_SECONDS and f.errors == 0
        print(f"  {devices:>9,}{rate:>11,.0f}{f.rate:>12,.0f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}  "
              + ("pass" if passed else "FAIL"))
        if not passed:
            break
        largest = devices
    print(f"  the largest fleet that passed: {largest:,} devices" if largest else "  no fleet size passed")


def storage_section(plan: Plan, workdir: Path, against: Path | None) -> None:
    n = plan.storage_devices
    heartbeats_a_day = HEARTBEATS_PER_DAY - HEARTBEATS_PER_DAY // MISSED_EVERY
    print(f"\n6. Storage: {n} devices each send a day over HTTP, {heartbeats_a_day:,} heartbeats (a minute each, "
          f"every {MISSED_EVERY}th missed) and {UPLOADS_A_DAY} uploads,")
    print(f"   from {STORAGE_CLIENTS} clients in a closed loop: the fleet's day in time order, the same shuffled, and "
          "its heartbeats alone in time order.")
    print("   The database's growth after a checkpoint, a device-day, and by table from dbstat (\"the rest\": the "
          "devices' own rows, their indexes, free pages)")
    print(f"  {'':<{LABEL_WIDTH - 8}}{'a device-day':>14}{'heartbeats':>12}{'uploads':>10}{'the rest':>10}"
          f"{'errors':>8}{'seconds':>9}")
    device_ids = fleet_ids(n)
    devices_csv = write_devices_csv(workdir / "storage.csv", device_ids)
    in_order = fleet_day(device_ids)
    shuffled = random.Random(0).sample(in_order, len(in_order))
    runs = {"in time order": in_order, "shuffled": shuffled, "heartbeats only": fleet_day(device_ids, True)}
    scripts = {"fleetmon": FLEETMON_SCRIPT}
    if against:
        scripts["earlier"] = against / "fleetmon.py"
    per_day = {}
    for name, script in scripts.items():
        for run, requests in runs.items():
            database = new_database(workdir, f"storage-{name}-{run.replace(' ', '-')}", devices_csv, script)
            before, size_before = bytes_by_table(database), checkpoint(database)
            with fleetmon_server(workdir, database, devices_csv, script=script) as port:
                result = generate_load(ClosedLoop(port, [requests[client::STORAGE_CLIENTS]
                                                         for client in range(STORAGE_CLIENTS)]))
            growth = (checkpoint(database) - size_before) / n
            after = bytes_by_table(database)
            grew = {table: (after[table] - before[table]) / n for table in after.keys() | before.keys()}
            heartbeats = grew.get("online_hours", 0) + grew.get("heartbeat_minutes", 0)
            uploads = grew.get("uploads", 0)
            errors = figures(result).errors
            # Rounded before printing, so that a rest of a fraction of a byte below zero shows as 0.
            print(f"  {name + ', ' + run:<{LABEL_WIDTH - 8}}{round(growth):>12,} B{round(heartbeats):>10,} B"
                  f"{round(uploads):>8,} B{round(growth - heartbeats - uploads):>8,} B{errors:>8,}{result.seconds:>9.1f}")
            per_day[name, run] = growth
    for name in scripts:
        heartbeats_only, with_uploads = per_day[name, "heartbeats only"], per_day[name, "in time order"]
        print(f"  {name}: {with_uploads / 1024:.2f} KiB a device-day with uploads, {heartbeats_only / 1024:.2f} KiB "
              f"with heartbeats only (in time order)")
    print(f"  a year of {YEAR_FLEET:,} devices, from the day in time order (a device-day's growth times the days):")
    for name in scripts:
        year = YEAR_FLEET * 365 * per_day[name, "in time order"]
        line = f"    {name}: {year / 2**30:,.1f} GiB"
        if name == "fleetmon":
            # Pruned a whole hour at a time, once the window has moved an hour: up to two
            # hours more than the days kept. Pruned pages are reused, not given back.
            kept = YEAR_FLEET * (YEAR_KEEP_DAYS + 2 / 24) * per_day[name, "in time order"]
            line += f", with --keep-days {YEAR_KEEP_DAYS} {kept / 2**30:,.1f} GiB"
        else:
            line += " (it has no --keep-days)"
        print(line)


PRUNED = """
    SELECT count(*) FROM devices AS device WHERE kept_from IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM online_hours WHERE device_key = device.device_key AND hour < device.kept_from / 60)
    AND NOT EXISTS (SELECT 1 FROM uploads WHERE device_key = device.device_key AND sent_at < device.kept_from * 60)
"""


def pruning_section(plan: Plan, workdir: Path) -> None:
    n, days = plan.backlog_devices, plan.backlog_days
    print(f"\n7. Pruning under load: {n:,} devices with {days} days of history each, built straight into the tables; "
          f"fleetmon started with --keep-days {PRUNING_KEEP_DAYS}")
    print(f"   and {PRUNING_RATE} heartbeats/s paced for {plan.pruning_seconds:g} s while it prunes; the database "
          "read every 0.25 s to see which devices are pruned")
    device_ids = fleet_ids(n)
    devices_csv = write_devices_csv(workdir / "backlog.csv", device_ids)
    database = new_database(workdir, "backlog", devices_csv)
    started = time.monotonic()
    hours, uploads = build_backlog(database, days)
    print(f"  built in {time.monotonic() - started:.1f} s: {hours:,} online_hours rows (full hours), {uploads:,} uploads "
          f"({BACKLOG_UPLOADS_A_DAY} a day), {checkpoint(database) / 2**20:,.0f} MiB")
    order = random.Random(0).sample(device_ids, n)
    # A device's k-th heartbeat in the k-th minute after its history ends.
    requests = [heartbeat(order[i % n], i // n) for i in range(round(PRUNING_RATE * plan.pruning_seconds))]
    pruned_at = None
    with fleetmon_server(workdir, database, devices_csv, "--keep-days", str(PRUNING_KEEP_DAYS)) as port, \
            closing(sqlite3.connect(database, timeout=10)) as db, ThreadPoolExecutor(1) as pool:
        listening = time.monotonic()
        load = pool.submit(generate_load, OpenLoop(port, paced(requests, PRUNING_RATE)))
        load_started = time.monotonic() - listening
        load_ended = pruned_by_then = None
        while True:
            now = time.monotonic()
            pruned = db.execute(PRUNED).fetchone()[0]
            if load_ended is None and load.done():
                load_ended, pruned_by_then = now - listening, pruned
            if pruned_at is None and pruned == n:
                pruned_at = now - listening
            if load_ended is not None and (pruned_at is not None
                                           or now - listening > load_ended + PRUNING_WATCH_AFTER_SECONDS):
                break
            time.sleep(0.25)
        result = load.result()
    outcomes = result.outcomes
    while_pruning = [o for o in outcomes if pruned_at is None or load_started + o.at < pruned_at]
    print(f"  heartbeats while it pruned: {latencies_line(while_pruning)}; {against_claim(while_pruning)}")
    if len(while_pruning) < len(outcomes):
        print(f"  all heartbeats: {latencies_line(outcomes)}")
    if pruned_at is None:
        print(f"  pruning not done {PRUNING_WATCH_AFTER_SECONDS} s after the heartbeats stopped: {pruned:,} of {n:,} "
              "devices pruned")
    else:
        print(f"  every device pruned {pruned_at:.1f} s after fleetmon began listening; {pruned_by_then:,} of {n:,} "
              f"were when the heartbeats stopped, {load_ended:.1f} s after it began")
    with closing(sqlite3.connect(database)) as db:
        left = db.execute("SELECT (SELECT count(*) FROM online_hours), (SELECT count(*) FROM uploads)").fetchone()
    print(f"  left: {left[0]:,} online_hours rows, {left[1]:,} uploads "
          f"({left[0] / n:,.0f} and {left[1] / n:,.0f} a device); the file stays {checkpoint(database) / 2**20:,.0f} MiB, "
          "its pruned pages free for reuse")


@contextmanager
def silent_receiver() -> Iterator[tuple[int, list[socket.socket]]]:
    """A port that accepts every connection and then neither reads nor answers; yields
    the port and the list of the connections it has accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=accept, name="silent receiver")
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def silent_webhook_section(plan: Plan, workdir: Path) -> None:
    flappers, seconds = plan.flapping_devices, plan.webhook_seconds
    print(f"\n8. An alert receiver that accepts connections and never answers: fleetmon with --down-after 1s and it as "
          f"--alert-url; {WEBHOOK_STEADY_DEVICES} devices")
    print(f"   beat every {BEAT_SECONDS:g} s for {seconds:g} s ({WEBHOOK_STEADY_DEVICES / BEAT_SECONDS:.0f}/s, paced), "
          f"and {flappers} more as well, except that each in turn falls silent for {SILENT_SECONDS:g} s: down, then "
          "up again")
    device_ids = fleet_ids(WEBHOOK_STEADY_DEVICES + flappers)
    flapping, steady = device_ids[:flappers], device_ids[flappers:]
    devices_csv = write_devices_csv(workdir / "webhook.csv", device_ids)
    database = new_database(workdir, "webhook", devices_csv)
    # Each device's beats spread over the half second; the flapping ones' silences one
    # after another, from the first second to two seconds before the end.
    silences = {device_id: 1 + number * (seconds - 2 - SILENT_SECONDS) / flappers
                for number, device_id in enumerate(flapping)}
    beats = []  # (due, request, from a steady device)
    for number, device_id in enumerate(steady + flapping):
        offset = number / len(device_ids) * BEAT_SECONDS
        silent_from = silences.get(device_id, math.inf)
        for beat in range(int((seconds - offset) / BEAT_SECONDS)):
            due = offset + beat * BEAT_SECONDS
            if not silent_from <= due < silent_from + SILENT_SECONDS:
                beats.append((due, heartbeat(device_id, beat), device_id not in silences))
    beats.sort(key=lambda beat: beat[0])
    with silent_receiver() as (alert_port, accepted):
        with fleetmon_server(workdir, database, devices_csv, "--down-after", "1s",
                             "--alert-url", f"http://127.0.0.1:{alert_port}/") as port:
            result = generate_load(OpenLoop(port, [(due, request) for due, request, _ in beats]))
            ended_ms = time.time_ns() // 1_000_000
        connections = len(accepted)
    with closing(sqlite3.connect(database)) as db:
        alerts = dict(db.execute("SELECT status, count(*) FROM alerts WHERE at_ms <= ? GROUP BY status",
                                 (ended_ms,)).fetchall())
        delivered = db.execute("SELECT count(*) FROM alerts WHERE delivered").fetchone()[0]
    steady_outcomes = [o for o in result.outcomes if beats[o.source][2]]
    print(f"  steady devices: {latencies_line(steady_outcomes)}; {against_claim(steady_outcomes)}")
    print(f"  flapping devices: {latencies_line([o for o in result.outcomes if not beats[o.source][2]])}")
    print(f"  alerts queued while it ran: {alerts.get('down', 0):,} down, {alerts.get('up', 0):,} up; "
          f"delivered {delivered:,}; connections the receiver took: {connections:,}")


class AlertReceiver(http.server.BaseHTTPRequestHandler):
    """Takes each alert POSTed to it, and puts it on its server's queue with the time."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.alerts.put((time.monotonic(), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def alert_receiver() -> Iterator[tuple[int, queue.Queue]]:
    server = http.server.HTTPServer(("127.0.0.1", 0), AlertReceiver)
    server.alerts = queue.Queue()
    thread = threading.Thread(target=server.serve_forever, name="alert receiver")
    thread.start()
    try:
        yield server.server_port, server.alerts
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def first_after(signals: queue.Queue, matches: Callable[[object], bool]) -> float | None:
    """When the first signal that matches came (time.monotonic()), waiting for it up to
    SIGNAL_WAIT_SECONDS; the others before it are dropped. None if none came."""
    deadline = time.monotonic() + SIGNAL_WAIT_SECONDS
    while True:
        try:
            at, signal = signals.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if matches(signal):
            return at


def down_detection_section(plan: Plan, workdir: Path) -> None:
    print(f"\n9. Down and up again: fleetmon with --down-after {DOWN_AFTER_SECONDS}s, its lines read as printed and an "
          "alert receiver; a device sends a heartbeat and falls silent until declared down,")
    print(f"   then sends again; {plan.down_repeats} times. From its last heartbeat's answer to the \"is down\" line and "
          "alert; from the next one's sending to the \"is up again\" line and alert")
    print(f"  {'':<4}{'down: line':>12}{'alert':>10}{'up: line':>12}{'alert':>10}")
    device_id = next(iter(PUBLISHED_DAYS))
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    database = new_database(workdir, "down", devices_csv)
    downs, ups = [], []

    def seconds(since: float, at: float | None) -> str:
        return "none" if at is None else f"{at - since:.3f} s"

    with alert_receiver() as (alert_port, alerts), \
            fleetmon_with_lines(database, devices_csv, "--down-after", f"{DOWN_AFTER_SECONDS}s",
                                "--alert-url", f"http://127.0.0.1:{alert_port}/") as (port, lines):
        _, answered = post_heartbeat(port, device_id, 0)
        for repeat in range(1, plan.down_repeats + 1):
            down_line = first_after(lines, lambda line: f"{device_id} is down" in line)
            down_alert = first_after(alerts, lambda alert: alert["device_id"] == device_id and alert["status"] == "down")
            sent, next_answered = post_heartbeat(port, device_id, repeat)
            up_line = first_after(lines, lambda line: f"{device_id} is up again" in line)
            up_alert = first_after(alerts, lambda alert: alert["device_id"] == device_id and alert["status"] == "up")
            print(f"  {repeat:<4}{seconds(answered, down_line):>12}{seconds(answered, down_alert):>10}"
                  f"{seconds(sent, up_line):>12}{seconds(sent, up_alert):>10}")
            downs += [at - answered for at in (down_line, down_alert) if at is not None]
            ups += [at - sent for at in (up_line, up_alert) if at is not None]
            answered = next_answered
    if downs and ups:
        print(f"  slowest: down {max(downs):.3f} s after the last heartbeat, up {max(ups):.3f} s after the next")


def python_order(database: Path, rows: int) -> tuple[float, float, bool]:
    """Seconds to take the fleet page's first rows by reading every device and sorting
    them in Python, with fleetmon.uptime_percent; seconds to walk the index for them
    instead; and whether both give the same devices in the same order. Medians of 3."""

    def concern(device: sqlite3.Row) -> tuple:
        down_since = device["down_since_ms"]
        return (down_since is None, down_since or 0, device["online_minutes"] == 0 and device["upload_count"] == 0,
                fleetmon.uptime_percent(device["online_minutes"], device["first_minute"], device["last_minute"]),
                device["device_id"])

    in_python, walked, same = [], [], True
    with closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        for _ in range(3):
            started = time.perf_counter()
            first = sorted(db.execute("SELECT * FROM devices WHERE listed").fetchall(), key=concern)[:rows]
            in_python.append(time.perf_counter() - started)
            started = time.perf_counter()
            # The index covers the listed devices only: a walk along it must ask for them.
            walk = db.execute(f"SELECT * FROM devices INDEXED BY devices_by_concern WHERE listed"
                              f" ORDER BY {fleet.BY_CONCERN} LIMIT ?", (rows,)).fetchall()
            walked.append(time.perf_counter() - started)
            same = same and [d["device_id"] for d in first] == [d["device_id"] for d in walk]
    return statistics.median(in_python), statistics.median(walked), same


def fleet_page_section(plan: Plan, workdir: Path) -> None:
    n = plan.page_devices
    print(f"\n10. The fleet at {n:,} devices, built straight into the tables: a day of telemetry each, hours full, "
          f"partly online or missing, {DOWN_SHARE:.0%} down, {NEVER_HEARD_SHARE:.0%} never heard.")
    print(f"   Each page and list {plan.page_requests} times one after another; then {PAGE_HEARTBEAT_RATE} heartbeats/s "
          f"paced for {plan.page_load_seconds:g} s with no tab open, then while 4 tabs each reload a page "
          f"{TAB_PAUSE_SECONDS:g} s after it came: all four unfiltered, then all four filtered to the whole fleet")
    device_ids = [f"cam-{number:05d}" for number in range(n)]
    devices_csv = write_devices_csv(workdir / "cameras.csv", device_ids)
    database = new_database(workdir, "cameras", devices_csv)
    started = time.monotonic()
    now_ms = time.time_ns() // 1_000_000
    counts, up = build_fleet(database, now_ms)
    with closing(sqlite3.connect(database)) as db:
        stored = db.execute("SELECT (SELECT count(*) FROM online_hours), (SELECT count(*) FROM uploads)").fetchone()
    print(f"  built in {time.monotonic() - started:.1f} s: {counts['up']:,} up, {counts['down']:,} down, "
          f"{counts['never']:,} never heard; {stored[0]:,} online_hours rows, {stored[1]:,} uploads")
    in_python, walked, same = python_order(database, fleet.FLEET_PAGE_ROWS)
    print(f"  the page's first {fleet.FLEET_PAGE_ROWS} in its order: every device read and sorted in Python "
          f"{ms(in_python)}, the index walked {ms(walked)} ({'the same devices' if same else 'NOT the same devices'})")
    pages = math.ceil(n / fleet.FLEET_PAGE_ROWS)
    whole_fleet = "/?q=cam-"
    # Ids with a 0 in them: a filter matching many, short of the whole fleet.
    zeros = sum("0" in device_id for device_id in device_ids)
    last_of_zeros = math.ceil(zeros / fleet.FLEET_PAGE_ROWS)
    probes = {
        "GET / for a browser": ("/", BROWSER_ACCEPT),
        "GET /?q=cam-04217 (one match)": ("/?q=cam-04217", BROWSER_ACCEPT),
        f"GET /?q=cam-0 ({min(n, 10_000):,} matches)": ("/?q=cam-0", BROWSER_ACCEPT),
        f"GET {whole_fleet} ({n:,} matches)": (whole_fleet, BROWSER_ACCEPT),
        f"GET /?page={pages // 2 + 1} (the middle)": (f"/?page={pages // 2 + 1}", BROWSER_ACCEPT),
        f"GET {whole_fleet}&page={pages} (the last)": (f"{whole_fleet}&page={pages}", BROWSER_ACCEPT),
        f"GET /?q=0&page={last_of_zeros} (last of {zeros:,})": (f"/?q=0&page={last_of_zeros}", BROWSER_ACCEPT),
        "GET /api/v1/devices?status=down": ("/api/v1/devices?status=down", "application/json"),
        "GET /metrics": ("/metrics", "*/*"),
    }
    print(f"  {'':<{LABEL_WIDTH - 8}}{'p50':>12}{'p99':>12}{'bytes':>12}{'status':>8}")
    # Devices that are up, each heard once in each run, in a minute after the one they were
    # last heard in: the first run's, then the next, so that every heartbeat stores a bit.
    beating = random.Random(0).sample(up, min(len(up), round(PAGE_HEARTBEAT_RATE * plan.page_load_seconds)))
    with fleetmon_server(workdir, database, devices_csv, "--down-after", "1h") as port:
        with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=60)) as connection:
            for label, (path, accept) in probes.items():
                answers = [timed_get(connection, path, accept) for _ in range(plan.page_requests)]
                times = [seconds for _, _, seconds in answers]
                print(f"  {label:<{LABEL_WIDTH - 8}}{ms(percentile(times, 0.5)):>12}{ms(percentile(times, 0.99)):>12}"
                      f"{answers[-1][1]:>12,}{answers[-1][0]:>8}")
        for run, paths in enumerate(TAB_SETS, 1):
            minute = now_ms // 60_000 + run - FIRST_MINUTE
            schedule = paced([heartbeat(device_id, minute) for device_id in beating], PAGE_HEARTBEAT_RATE)
            tabs = tuple(http_request("GET", path, accept=BROWSER_ACCEPT) for path in paths)
            result = generate_load(OpenLoop(port, schedule, tabs=tabs, tab_pause=TAB_PAUSE_SECONDS))
            heartbeats = [o for o in result.outcomes if o.source < len(schedule)]
            beside = f"beside the tabs {', '.join(paths)}" if paths else "with no tab open"
            print(f"  heartbeats {beside}: {latencies_line(heartbeats)}; "
                  f"{against_claim(heartbeats)}")
            for number, path in enumerate(paths):
                loads = [o for o in result.outcomes if o.source == len(schedule) + number]
                print(f"    tab {number + 1}, {path}: {latencies_line(loads).replace('requests', 'pages')}")


# Section 11's child processes, given the database and the devices file: fleetmon's app
# made and let go, which upgrades the database; and the same on a disk with no room,
# where fleetmon refuses and says what it needs.
UPGRADE = """
import sys
import fleetmon

app = fleetmon.create_app(database=sys.argv[1], devices_csv=sys.argv[2])
print(f"fleetmon: {app.config['UPGRADED']}")
fleetmon.close_storage(app)
"""
UPGRADE_WITH_NO_ROOM = """
import shutil
import sys
import fleetmon

usage = shutil.disk_usage
shutil.disk_usage = lambda path: usage(path)._replace(free=0)
try:
    fleetmon.create_app(database=sys.argv[1], devices_csv=sys.argv[2])
except fleetmon.StartupError as error:
    print(f"fleetmon: {error}")
"""
NEEDS = re.compile(r"needs about ([\d,]+) MiB free")
STILL_UPGRADING = "fleetmon: still upgrading"


@dataclass
class ChildRun:
    lines: list[tuple[float, str]]  # what it printed, each line with when, in seconds from its start
    seconds: float
    peak_memory: int  # bytes
    peak_wal: int  # bytes of the database's write-ahead log
    peak_disk: int  # bytes of its disk taken, over what was free when it started


def watched_child(code: str, database: Path, devices_csv: Path) -> ChildRun:
    """Run Python code in a process of its own, with the database and the devices file as
    its arguments, to its end, while a thread looks at the database's write-ahead log and
    its disk's free space every POLL_SECONDS. Unix only: os.wait4."""
    wal = database.with_name(database.name + "-wal")
    free_at_start = shutil.disk_usage(database.parent).free
    peaks = {"wal": 0, "disk": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                wal_size = wal.stat().st_size
            except FileNotFoundError:
                wal_size = 0
            peaks["wal"] = max(peaks["wal"], wal_size)
            peaks["disk"] = max(peaks["disk"], free_at_start - shutil.disk_usage(database.parent).free)

    poller = threading.Thread(target=poll, name="upgrade's files")
    started = time.monotonic()
    # Unbuffered (-u), so that each line comes when printed.
    process = subprocess.Popen([sys.executable, "-u", "-c", code, str(database), str(devices_csv)], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    poller.start()
    lines = [(time.monotonic() - started, line.rstrip("\n")) for line in process.stdout]
    # Its own usage: getrusage(RUSAGE_CHILDREN) would give the largest of every child
    # waited for so far, the servers and load generators of the sections before included.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    stop.set()
    poller.join()
    if process.returncode != 0:
        raise RuntimeError("a child process failed:\n" + "\n".join(line for _, line in lines))
    # ru_maxrss is in KiB, but in bytes on macOS.
    peak_memory = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return ChildRun(lines, seconds, peak_memory, peaks["wal"], peaks["disk"])


def upgrade_section(plan: Plan, workdir: Path) -> None:
    n, days = plan.upgrade_devices, plan.upgrade_days
    print(f"\n11. Upgrade: the first layout (schema version 0) built straight with SQL, {n:,} devices with {days} days "
          f"each of a heartbeat a minute (every {MISSED_EVERY}th missed) and {UPLOADS_A_DAY} uploads a day;")
    print(f"   fleetmon's create_app upgrades it in a process of its own, its -wal file and the disk's free space looked "
          f"at every {POLL_SECONDS:g} s; then each device's stats as GET stats reads them, against the first layout's")
    # Ids as section 10's cameras': each heartbeat row repeats one, so their length sets the size.
    device_ids = [f"cam-{number:05d}" for number in range(n)]
    devices_csv = write_devices_csv(workdir / "first-layout.csv", device_ids)
    database = workdir / "first-layout.db"
    started = time.monotonic()
    heartbeats, uploads = build_first_layout(database, device_ids, days)
    size_before = checkpoint(database)
    print(f"  built in {time.monotonic() - started:.1f} s: {heartbeats:,} heartbeat_minutes rows, {uploads:,} uploads; "
          f"{size_before / 2**20:,.1f} MiB")
    with closing(sqlite3.connect(database)) as db:
        before = {device_id: fleetmon.device_stats(fleetmon.Aggregates(*aggregates)) for device_id, *aggregates in
                  db.execute("SELECT device_id, online_minutes, first_minute, last_minute, upload_count,"
                             " upload_total_ns FROM device_stats")}

    refusal = "\n".join(line for _, line in watched_child(UPGRADE_WITH_NO_ROOM, database, devices_csv).lines)
    if needs := NEEDS.search(refusal):
        needed = int(needs.group(1).replace(",", "")) * 2**20
        print(f"  on a disk with no room it refuses, needing about {needed / 2**20:,.0f} MiB free "
              f"({needed / size_before:.2f}x the file)")
    else:
        print(f"  on a disk with no room it did not say what it needs: {refusal}")
    run = watched_child(UPGRADE, database, devices_csv)
    size_after = database.stat().st_size
    print(f"  upgraded in {run.seconds:.1f} s, the process's whole run; its peak memory {run.peak_memory / 2**20:,.0f} MiB")
    print(f"  the -wal file at most {run.peak_wal / 2**20:,.1f} MiB ({run.peak_wal / size_before:.2f}x the file before); "
          f"the disk's free space at most {run.peak_disk / 2**20:,.1f} MiB less ({run.peak_disk / size_before:.2f}x), "
          "whoever else wrote to it meanwhile included")
    print(f"  the file {size_before / 2**20:,.1f} MiB before, {size_after / 2**20:,.1f} MiB after")
    progress = [at for at, line in run.lines if line.startswith(STILL_UPGRADING)]
    since, until = max(pairwise(at for at, _ in run.lines), key=lambda pair: pair[1] - pair[0], default=(0, 0))
    print(f"  its lines: {len(progress)} saying it is still upgrading; the longest silence between two lines "
          f"{until - since:.1f} s, from {since:.1f} s to {until:.1f} s of its run")
    for _, line in run.lines:
        if not line.startswith(STILL_UPGRADING):
            print(f"    {line}")

    with closing(fleetmon.connect(database)) as db:
        after = {device_id: fleetmon.device_stats(fleetmon.aggregates_of(fleetmon.read_device(db, device_id)))
                 for device_id in before}
        minutes = sum(bits.bit_count() for (bits,) in db.execute("SELECT minutes FROM online_hours"))
        uploads_after = db.execute("SELECT count(*) FROM uploads").fetchone()[0]
    differ = [device_id for device_id, stats in before.items() if after[device_id] != stats]
    if differ:
        first = differ[0]
        print(f"  stats DIFFER for {len(differ):,} of {len(before):,} devices; {first}: {before[first]} before, "
              f"{after[first]} after")
    else:
        print(f"  every device's stats identical before and after: {len(before):,} devices, "
              f"{sum(stats is None for stats in before.values())} of them with none")
    print(f"  online minutes in online_hours' bits {minutes:,}, of {heartbeats:,} heartbeat_minutes rows; "
          f"uploads {uploads_after:,}, of {uploads:,}")


# --- Entry point ------------------------------------------------------------------------

SECTIONS = 11


def section_numbers(text: str) -> set[int]:
    try:
        numbers = {int(part) for part in text.split(",")}
    except ValueError:
        numbers = set()
    if not numbers or not numbers <= set(range(1, SECTIONS + 1)):
        raise argparse.ArgumentTypeError(f"give section numbers from 1 to {SECTIONS}, separated by commas, like 6,7")
    return numbers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run each section briefly, as a smoke run")
    parser.add_argument("--against", type=Path, metavar="DIR",
                        help="also measure DIR/fleetmon.py, an earlier fleetmon, in sections 1, 2 and 6")
    parser.add_argument("--only", type=section_numbers, metavar="N,N", help="run these sections only")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="turns each server takes in sections 1 to 3 (more rounds, steadier medians)")
    # The benchmark runs itself in other processes as the floor server and the load generator.
    parser.add_argument("--serve-floor", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    parser.add_argument("--generate-load", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return
    if args.generate_load:
        serve_load_job()
        return
    against = args.against.resolve() if args.against else None
    if against and not (against / "fleetmon.py").is_file():
        parser.error(f"--against {args.against}: there is no fleetmon.py in it")

    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is known
    # Whatever else the machine runs takes CPU from the servers and moves every figure.
    print(f"fleetmon benchmark{' (quick)' if args.quick else ''}: {os.cpu_count()} cores, {load_average()}, "
          f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
          f"waitress {version('waitress')} with {FLOOR_THREADS} worker thread(s) for the devices' requests")
    if against:
        print(f"earlier: the fleetmon of {earlier_label(against)}")
    sections = [
        partial(closed_loop_section, plan, against=against),
        partial(burst_section, plan, against=against),
        partial(stats_read_section, plan),
        partial(overload_section, plan),
        partial(fleet_size_section, plan),
        partial(storage_section, plan, against=against),
        partial(pruning_section, plan),
        partial(silent_webhook_section, plan),
        partial(down_detection_section, plan),
        partial(fleet_page_section, plan),
        partial(upgrade_section, plan),
    ]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetmon-benchmark-") as folder:
        for number, section in enumerate(sections, 1):
            if args.only is None or number in args.only:
                section(workdir=Path(folder))
    print(f"\nthe benchmark took {time.monotonic() - started:.0f} s; {load_average()} at the end")


if __name__ == "__main__":
    main()
