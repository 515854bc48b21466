"""How fast fleetmon is, how many devices it serves, and how it bears overload.

    python benchmark.py            the whole benchmark: 5 to 10 minutes on 2 cores
    python benchmark.py --quick    every section for a few seconds, as a smoke run

It prints figures and asserts nothing. Each server it measures is a process of its own on
a free loopback port, with its database in a temporary folder; by the end every one is
stopped and the folder removed. The sections:

1. Closed loop: 16, then 64 clients each POST (a heartbeat, or an upload) again as soon
   as they are answered, to fleetmon and to a "floor": Flask on stock waitress with
   fleetmon's number of worker threads, doing nothing but parse the JSON body and answer
   204. The two take turns, round after round; the median round is shown.
2. The device simulator's burst: the day simulator.py sends the vendor's 5 devices, each
   device's from a client of its own, all at once, to a fresh fleetmon and a fresh floor.
3. GET stats with 1,000 and with 1,000,000 heartbeats stored: the latency should not move.
4. Overload: fleetmon's capacity in a closed loop, then 1.3 times that paced for 30 s,
   then 0.3 times for 10 s: how much it answers, and how soon it recovers.
5. How many devices: what N devices send, paced for 60 s, for N in rising steps until the
   p99 latency reaches 50 ms or a request fails; and the database's growth a device a day.
6. The fleet page (GET / for a browser) at 100,000 devices.

The load comes from another process (this file, run with --generate-load), which drives
all its connections from one thread through non-blocking sockets, with the requests
encoded beforehand, so that it takes little of the CPU it shares with the servers. Its
clients keep a connection open until the server closes it, as stock waitress does after
every 204, and then open another. In a closed loop, latency counts from sending. In an
open loop each request is due at a time fixed beforehand and its latency counts from then,
so that a slow server cannot hold the load back and hide its queue. Requests wait in the
client for one of at most 64 connections, so in sections 4 and 5 a fleet's requests share
them as they would behind a proxy; devices with a connection each would hold many more.
A request is given up, and counted as an error, after waiting 2 s for a connection or 2 s
for its answer.

Other work on the machine takes CPU from the servers and moves every figure; the first
line tells the load average when the run began.
"""

import argparse
import http.client
import json
import math
import os
import pickle
import platform
import random
import re
import selectors
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from importlib.metadata import version
from itertools import count
from pathlib import Path

import fleetmon
from simulator import PUBLISHED_DAYS, UPLOADS_A_DAY, simulated_day

HERE = Path(__file__).resolve().parent
FLEETMON_SCRIPT = HERE / "fleetmon.py"
BENCHMARK_SCRIPT = Path(__file__).resolve()
FLOOR_THREADS = fleetmon.WAITRESS_SETTINGS["threads"]

# What a device of the fleet sends in a day: a heartbeat a minute, the simulator's
# uploads, and a few reads of its stats by whoever watches it.
HEARTBEATS_PER_DAY = 24 * 60
READS_PER_DAY = 10
REQUESTS_PER_DEVICE_SECOND = (HEARTBEATS_PER_DAY + UPLOADS_A_DAY + READS_PER_DAY) / 86_400

FIRST_DAY = datetime(2024, 1, 1)  # UTC
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
FLEET_PAGE_DEVICES = 100_000
FLEET_PAGE_ROWS = 100
# Section 5 passes a fleet size whose p99 stays under this, with no error.
CLAIM_P99_SECONDS = 0.050


@dataclass(frozen=True)
class Plan:
    """How long each section runs."""

    rounds: int  # turns each server takes in sections 1 to 3
    closed_loop_seconds: float
    read_seconds: float
    capacity_seconds: float
    overload_seconds: int
    recovery_seconds: int
    fleet_sizes: tuple[int, ...]
    fleet_step_seconds: float
    fleet_page_requests: int


FULL = Plan(
    rounds=3, closed_loop_seconds=3, read_seconds=2, capacity_seconds=3,
    overload_seconds=30, recovery_seconds=10,
    # 300,000 devices send 5,400 requests a second, more than the floor answers here.
    fleet_sizes=(25_000, 50_000, 100_000, 150_000, 200_000, 250_000, 300_000),
    fleet_step_seconds=60, fleet_page_requests=10,
)
QUICK = Plan(
    rounds=1, closed_loop_seconds=1, read_seconds=1, capacity_seconds=1,
    overload_seconds=4, recovery_seconds=3,
    fleet_sizes=(25_000, 50_000), fleet_step_seconds=4, fleet_page_requests=3,
)


# --- Requests -----------------------------------------------------------------------


def http_request(method: str, path: str, body: dict | None = None) -> bytes:
    """One HTTP/1.1 request as bytes, ready to send."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is None:
        return f"{head}\r\n".encode()
    data = json.dumps(body).encode()
    return f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


def sent_at(minute: int, second: int = 0) -> str:
    """RFC 3339 for a second of a minute counted from FIRST_DAY."""
    # isoformat() of a naive UTC time is three times quicker than strftime(), which
    # matters for the hundreds of thousands of requests encoded beforehand.
    return (FIRST_DAY + timedelta(minutes=minute, seconds=second)).isoformat() + "Z"


def heartbeat(device_id: str, minute: int) -> bytes:
    return http_request("POST", f"/api/v1/devices/{device_id}/heartbeat", {"sent_at": sent_at(minute, 17)})


def upload(device_id: str, minute: int, upload_time_ns: int) -> bytes:
    body = {"sent_at": sent_at(minute), "upload_time": upload_time_ns}
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
        self.requests_sent = 0  # tells this request's deadline from an earlier one's
        self.opened = 0

    def send(self, request: bytes, started: float) -> None:
        self.busy, self.unsent, self.started = True, request, started
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


@dataclass
class LoadResult:
    # For each request: when it was sent (closed loop) or due (open loop), in seconds
    # from the start; its latency, None if the client gave up; its status, or why none.
    outcomes: list[tuple[float, float | None, int | str]]
    seconds: float  # from the start to the last answer, or to the end of a timed run
    connections_opened: int


class LoadGenerator:
    """Connections on one selector, and the outcome of every request they sent."""

    def __init__(self, port: int):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []
        self.outcomes = []
        self.in_flight = 0
        # (when to give up, connection, its request's number), in the order sent,
        # which is also the order of the deadlines.
        self.deadlines: deque[tuple[float, Connection, int]] = deque()
        self.start = time.perf_counter()

    def new_connection(self) -> Connection:
        connection = Connection(self.port, self.selector)
        self.connections.append(connection)
        return connection

    def send(self, connection: Connection, request: bytes, started: float) -> None:
        connection.send(request, started)
        self.in_flight += 1
        deadline = time.perf_counter() + GIVE_UP_SECONDS
        self.deadlines.append((deadline, connection, connection.requests_sent))

    def record(self, started: float, answered: float | None, status: int | str) -> None:
        latency = None if answered is None else answered - started
        self.outcomes.append((started - self.start, latency, status))

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
                self.record(connection.started, now, status)
                free.append(connection)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, connection, number = self.deadlines.popleft()
            if connection.busy and connection.requests_sent == number:
                connection.give_up()
                self.record(connection.started, None, GAVE_UP)
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
        scripts = {load.new_connection(): iter(script) for script in self.scripts}

        def send_next(connection: Connection) -> None:
            request = next(scripts[connection], None)
            if request is not None:
                load.send(connection, request, time.perf_counter())

        for connection in scripts:
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
    up to `connections`; requests with none free wait their turn, first due first."""

    port: int
    schedule: list[tuple[float, bytes]]  # (seconds from the start when due, request)
    connections: int = OPEN_LOOP_CONNECTIONS

    def run(self) -> LoadResult:
        load = LoadGenerator(self.port)
        idle: list[Connection] = []  # the last one freed is used first
        waiting: deque[tuple[float, bytes]] = deque()
        upcoming = iter((load.start + due, request) for due, request in self.schedule)
        next_due = next(upcoming, None)
        now = load.start
        while next_due or waiting or load.in_flight:
            while next_due and next_due[0] <= now:
                waiting.append(next_due)
                next_due = next(upcoming, None)
            while waiting and waiting[0][0] + GIVE_UP_SECONDS <= now:
                load.record(waiting.popleft()[0], None, NEVER_SENT)
            while waiting and (idle or len(load.connections) < self.connections):
                connection = idle.pop() if idle else load.new_connection()
                due, request = waiting.popleft()
                load.send(connection, request, due)
            free, now = load.wait(until=next_due[0] if next_due else now + 0.1)
            idle += free
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
    latencies = [latency for _, latency, _ in result.outcomes]
    answered = sum(succeeded(status) for _, _, status in result.outcomes)
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
    return "gave up" if seconds == math.inf else f"{seconds * 1000:,.2f} ms"


def print_header(first: str = "req/s") -> None:
    print(f"  {'':<38}{first:>9}{'p50':>12}{'p99':>12}{'errors':>8}{'connects/request':>18}")


def print_row(label: str, f: Figures) -> None:
    print(f"  {label:<38}{f.rate:>9,.0f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}"
          f"{f.connections_per_request:>18.2f}")


def print_ratios(label: str, ours: Figures, theirs: Figures) -> None:
    """Throughput and p99 of one measurement over another's, under their columns."""
    print(f"  {label:<38}{ours.rate / theirs.rate:>8.2f}x{'':>12}{ours.p99 / theirs.p99:>11.2f}x")


def in_turns(runs: dict[str, Callable[[], Figures]], rounds: int) -> dict[str, Figures]:
    """Run each measurement in turn, round after round, and keep the medians. Taking
    turns spreads whatever else the machine does over all of them alike."""
    results = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return {name: median_figures(rounds) for name, rounds in results.items()}


# --- Servers and databases -----------------------------------------------------------

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


@contextmanager
def server_process(workdir: Path, name: str, args: list[str]) -> Iterator[int]:
    """Run Python with args; yield the port from the line it prints once listening.

    Its output goes to a file rather than a pipe, which would fill up unread and stop it.
    """
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=f"{name}-", suffix=".log", delete=False) as log:
        process = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield wait_for_port(process, Path(log.name))
    finally:
        process.kill()
        process.wait()


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


def fleetmon_server(workdir: Path, database: Path, devices_csv: Path):
    args = [str(FLEETMON_SCRIPT), "--port", "0", "--db", str(database), "--devices", str(devices_csv)]
    return server_process(workdir, "fleetmon", args)


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


def fleet_ids(n: int) -> list[str]:
    """n device ids shaped like the simulator's, which are MAC addresses."""
    return ["02-00-" + "-".join(f"{byte:02x}" for byte in i.to_bytes(4, "big")) for i in range(n)]


def write_devices_csv(path: Path, device_ids: list[str]) -> Path:
    path.write_text("device_id\n" + "\n".join(device_ids) + "\n", encoding="utf-8")
    return path


def new_database(workdir: Path, name: str, devices_csv: Path) -> Path:
    """A database with fleetmon's schema and its rows for the devices: fleetmon makes
    them when it starts, and is stopped once listening."""
    database = workdir / f"{name}.db"
    with fleetmon_server(workdir, database, devices_csv):
        pass
    checkpoint(database)
    return database


def checkpoint(database: Path) -> int:
    """Move the write-ahead log into the database; returns the database's size in bytes."""
    with closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = database.with_name(database.name + "-wal")
    return database.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def store_heartbeats(database: Path, rows) -> None:
    """Store (device_id, minute) rows straight into the table, triggers and all."""
    with closing(sqlite3.connect(database)) as db, db:
        db.executemany("INSERT INTO heartbeat_minutes (device_id, minute) VALUES (?, ?)", rows)
    checkpoint(database)


# --- Sections -------------------------------------------------------------------------


def telemetry_run(port: int, kind: str, clients: int, seconds: float, minutes: Iterator[int]) -> Figures:
    return figures_of(ClosedLoop(port, telemetry_scripts(kind, clients, seconds, minutes), seconds))


def closed_loop_section(plan: Plan, workdir: Path) -> None:
    print(f"\n1. Closed loop: each client POSTs again as soon as it is answered; {plan.closed_loop_seconds:g} s "
          f"a run, median of {plan.rounds} rounds, fleetmon and the floor taking turns")
    print_header()
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    minutes = count()  # shared, so that every heartbeat of every run stores a new row
    rates = {}
    with fleetmon_server(workdir, workdir / "closed-loop.db", devices_csv) as fleetmon_port, \
            floor_server(workdir) as floor_port:
        for kind in ("heartbeat", "upload"):
            for clients in CLIENT_COUNTS:
                medians = in_turns({
                    name: partial(telemetry_run, port, kind, clients, plan.closed_loop_seconds, minutes)
                    for name, port in (("fleetmon", fleetmon_port), ("floor", floor_port))
                }, plan.rounds)
                what = f"POST {kind}, {clients} clients, "
                print_row(what + "fleetmon", medians["fleetmon"])
                print_row(" " * len(what) + "floor", medians["floor"])
                print_ratios(" " * len(what) + "fleetmon/floor", medians["fleetmon"], medians["floor"])
                for name, f in medians.items():
                    rates[kind, clients, name] = f.rate
    low, high = CLIENT_COUNTS
    for kind in ("heartbeat", "upload"):
        print(f"  throughput at {high} clients over {low}, POST {kind}: " + ", ".join(
            f"{name} {rates[kind, high, name] / rates[kind, low, name]:.2f}x" for name in ("fleetmon", "floor")))


def burst_section(plan: Plan, workdir: Path) -> None:
    # Each device's day as simulator.py sends it, in order, from a client of its own.
    scripts = [[http_request("POST", event.path, event.body) for event in simulated_day(device_id)]
               for device_id in PUBLISHED_DAYS]
    requests = sum(map(len, scripts))
    print(f"\n2. The simulator's burst: {requests:,} requests from {len(scripts)} clients at once, "
          f"each server fresh with a new database; median of {plan.rounds} rounds")
    print_header(first="seconds")
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    databases = (workdir / f"burst-{n}.db" for n in count())

    def burst(server) -> Figures:
        with server as port:
            return figures(generate_load(ClosedLoop(port, scripts)))

    medians = in_turns({
        "fleetmon": lambda: burst(fleetmon_server(workdir, next(databases), devices_csv)),
        "floor": lambda: burst(floor_server(workdir)),
    }, plan.rounds)
    for name, f in medians.items():
        print(f"  {name:<38}{requests / f.rate:>9.2f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}"
              f"{f.connections_per_request:>18.2f}")
    print(f"  {'fleetmon/floor':<38}{medians['floor'].rate / medians['fleetmon'].rate:>8.2f}x")


def stats_read_section(plan: Plan, workdir: Path) -> None:
    print(f"\n3. GET stats from one client: {plan.read_seconds:g} s a run, median of {plan.rounds} rounds, "
          "the two servers taking turns")
    print_header()
    device_id = next(iter(PUBLISHED_DAYS))
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    script = [[stats_read(device_id)] * math.ceil(CLOSED_LOOP_MAX_RATE * plan.read_seconds)]
    servers = {}
    for stored in (1_000, 1_000_000):
        database = new_database(workdir, f"stored-{stored}", devices_csv)
        store_heartbeats(database, ((device_id, minute) for minute in range(stored)))
        servers[f"{stored:,} heartbeats stored"] = fleetmon_server(workdir, database, devices_csv)
    (few_name, few_server), (many_name, many_server) = servers.items()
    with few_server as few_port, many_server as many_port:
        medians = in_turns({
            name: partial(figures_of, ClosedLoop(port, script, plan.read_seconds))
            for name, port in ((few_name, few_port), (many_name, many_port))
        }, plan.rounds)
    for name, f in medians.items():
        print_row(name, f)
    print_ratios("a million over a thousand", medians[many_name], medians[few_name])


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

    during = [outcome for outcome in result.outcomes if outcome[0] < plan.overload_seconds]
    answered = sum(succeeded(status) and due + latency < plan.overload_seconds for due, latency, status in during)
    never_sent = sum(status == NEVER_SENT for _, _, status in during)
    given_up = sum(status == GAVE_UP for _, _, status in during)
    failed = sum(not succeeded(status) for _, _, status in during) - never_sent - given_up
    latencies = [latency for _, latency, _ in during]
    print(f"  during the overload: {answered / plan.overload_seconds:,.0f} answers/s = "
          f"{answered / plan.overload_seconds / capacity:.2f}x capacity; p50 {ms(percentile(latencies, 0.5))}, "
          f"p99 {ms(percentile(latencies, 0.99))}; errors {failed:,}")
    print(f"  of its {len(during):,} requests {never_sent + given_up:,} were given up after {GIVE_UP_SECONDS:g} s: "
          f"{never_sent:,} before a connection was free, {given_up:,} waiting for the answer")
    print("  after it, p99 of the requests due in each second:")
    for second in range(plan.recovery_seconds):
        start = plan.overload_seconds + second
        latencies = [latency for due, latency, _ in result.outcomes if start <= due < start + 1]
        given_up = sum(latency is None for latency in latencies)
        print(f"    {second:2d}-{second + 1:2d} s{ms(percentile(latencies, 0.99)):>12}   "
              f"given up {given_up:,} of {len(latencies):,}")


def fleet_size_section(plan: Plan, workdir: Path) -> None:
    print(f"\n5. How many devices: what N devices send ({HEARTBEATS_PER_DAY:,} heartbeats, {UPLOADS_A_DAY} uploads "
          f"and {READS_PER_DAY} stats reads a device a day), paced for {plan.fleet_step_seconds:g} s over at most "
          f"{OPEN_LOOP_CONNECTIONS} connections;")
    print(f"   a fleet passes with p99 under {CLAIM_P99_SECONDS * 1000:.0f} ms from when each request was due, "
          "and no error")
    print(f"  {'devices':>9}{'offered/s':>11}{'answered/s':>12}{'p50':>12}{'p99':>12}{'errors':>8}"
          f"{'database a device a day':>26}")
    largest = None
    for devices in plan.fleet_sizes:
        rate = devices * REQUESTS_PER_DEVICE_SECOND
        device_ids = fleet_ids(devices)
        devices_csv = write_devices_csv(workdir / f"fleet-{devices}.csv", device_ids)
        database = new_database(workdir, f"fleet-{devices}", devices_csv)
        size_before = checkpoint(database)
        schedule = paced(FleetTraffic(device_ids).take(round(rate * plan.fleet_step_seconds)), rate)
        with fleetmon_server(workdir, database, devices_csv) as port:
            f = figures_of(OpenLoop(port, schedule))
        passed = f.p99 < CLAIM_P99_SECONDS and f.errors == 0
        row = f"  {devices:>9,}{rate:>11,.0f}{f.rate:>12,.0f}{ms(f.p50):>12}{ms(f.p99):>12}{f.errors:>8,}"
        if not passed:  # it stored less than its devices sent: its growth would tell nothing
            print(f"{row}{'':>26}  FAIL")
            break
        # Each device sent what it sends in fleet_step_seconds of its day.
        growth = (checkpoint(database) - size_before) / (devices * plan.fleet_step_seconds / 86_400)
        print(f"{row}{growth / 1024:>22,.0f} KiB  pass")
        largest = (devices, growth)
    if largest is None:
        print("  no fleet size passed")
        return
    devices, growth = largest
    print(f"  the largest fleet that passed: {devices:,} devices; the database grows {growth / 1024:,.0f} KiB "
          f"a device a day, {growth * 365 / 2**20:,.1f} MiB a year")


def fleet_page_section(plan: Plan, workdir: Path) -> None:
    print(f"\n6. The fleet page, GET / for a browser: {FLEET_PAGE_DEVICES:,} devices, the {FLEET_PAGE_ROWS} shown "
          "with a day of heartbeats missing one minute in ten, the rest two heartbeats each")
    devices_csv = write_devices_csv(workdir / "simulator.csv", list(PUBLISHED_DAYS))
    with fleetmon_server(workdir, workdir / "page-probe.db", devices_csv) as port:
        content_type, _, _ = fleet_page(port)
    if not content_type.startswith("text/html"):
        print(f"  skipped: GET / with Accept: text/html answers {content_type!r}, not a page")
        return
    device_ids = fleet_ids(FLEET_PAGE_DEVICES)
    devices_csv = write_devices_csv(workdir / "page.csv", device_ids)
    database = new_database(workdir, "page", devices_csv)
    shown, others = device_ids[:FLEET_PAGE_ROWS], device_ids[FLEET_PAGE_ROWS:]
    rng = random.Random(0)
    # The shown devices come first by having the worst uptime; two heartbeats in a row
    # give every other device 100 %.
    store_heartbeats(database, [(device_id, minute) for device_id in shown
                                for minute in range(HEARTBEATS_PER_DAY) if rng.random() >= 0.1]
                     + [(device_id, minute) for device_id in others for minute in (0, 1)])
    with fleetmon_server(workdir, database, devices_csv) as port:
        pages = [fleet_page(port) for _ in range(plan.fleet_page_requests)]
    seconds = sorted(seconds for _, _, seconds in pages)
    print(f"  {len(pages)} requests one after another: p50 {ms(statistics.median(seconds))}, "
          f"slowest {ms(seconds[-1])}, {len(pages[0][1]):,} bytes")


def fleet_page(port: int) -> tuple[str, bytes, float]:
    """GET / as a browser asks for it: content type, body, seconds taken."""
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=60)) as connection:
        started = time.perf_counter()
        connection.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        response = connection.getresponse()
        body = response.read()
        return response.getheader("Content-Type", ""), body, time.perf_counter() - started


# --- Entry point ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run each section for a few seconds only")
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

    plan = QUICK if args.quick else FULL
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is known
    # Whatever else the machine runs takes CPU from the servers and moves every figure.
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"fleetmon benchmark{' (quick)' if args.quick else ''}: {os.cpu_count()} cores{load}, "
          f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
          f"waitress {version('waitress')} with {FLOOR_THREADS} worker thread(s)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleetmon-benchmark-") as folder:
        workdir = Path(folder)
        closed_loop_section(plan, workdir)
        burst_section(plan, workdir)
        stats_read_section(plan, workdir)
        overload_section(plan, workdir)
        fleet_size_section(plan, workdir)
        fleet_page_section(plan, workdir)
    print(f"\nthe benchmark took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
