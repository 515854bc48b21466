"""What fleetmon's tests share: the `app` and `client` fixtures (as in Flask's tutorial,
flaskr), the requests devices send, a look at what the database holds, fleetmon served
on waitress or as a process of its own, and the fake servers the tests talk to.

test_fleetmon.py beside this file is the contract; tests/ holds a file per concern.
pytest imports this file first and puts its folder on sys.path, so the tests import
fleetmon's modules, and these helpers, from the repository's root, wherever they are.
"""

import csv
import html
import http.server
import json
import os
import queue
import re
import select
import socket
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing, contextmanager, suppress
from http.client import HTTPConnection
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from waitress import wasyncore

import connections
import fleet
import fleetmon
import housekeeping
import status
from fleetmon import create_app, minute_to_rfc3339, utc_minute

HERE = Path(__file__).resolve().parent
DEVICES_CSV = HERE / "devices.csv"
DEVICE = "60-6b-44-84-dc-64"
OTHER_DEVICE = "b4-45-52-a2-f1-3c"
SENT_AT = "2024-01-01T10:04:00Z"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # as browsers send

# One randomness policy for the whole suite: the property tests run the same examples on
# every run (derandomize), so that CI cannot fail one day on a rare example and pass the
# next. Looking for new ones is a deliberate, local act: FLEETMON_HYPOTHESIS=explore python
# -m pytest -k any_ runs ten times the examples, new ones each run, and keeps any that fails
# in .hypothesis/. (An environment variable: pytest reads --hypothesis-profile before this
# file registers its profiles.) No deadline in either: it is a timing assert.
SHARED_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("repeatable", derandomize=True, max_examples=150, **SHARED_SETTINGS)
settings.register_profile("explore", max_examples=1_500, **SHARED_SETTINGS)
settings.load_profile(os.environ.get("FLEETMON_HYPOTHESIS", "repeatable"))


def pytest_configure(config):
    # A thread that dies of an exception (waitress's loop, a client, a fake server) fails
    # its test, not just warns.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning")


# --- The app ------------------------------------------------------------------------------


@contextmanager
def open_app(database, devices_csv=DEVICES_CSV, **settings):
    """create_app, closed after: whoever creates an app closes its connections and lets
    the database go (one fleetmon a database)."""
    app = create_app(database=database, devices_csv=devices_csv, **settings)
    try:
        yield app
    finally:
        fleetmon.close_storage(app)


@contextmanager
def restarted(app, devices_csv=None, **settings):
    """app stopped, and a fleetmon started again on its database, with its devices file
    or another one."""
    fleetmon.close_storage(app)
    with open_app(app.config["DATABASE"], devices_csv or app.config["DEVICES_CSV"], **settings) as again:
        yield again


@pytest.fixture
def app(tmp_path):
    with open_app(tmp_path / "fleetmon.db") as app:
        app.config["TESTING"] = True
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


# --- What devices send --------------------------------------------------------------------


def heartbeat_url(device_id=DEVICE):
    return f"/api/v1/devices/{device_id}/heartbeat"


def stats_url(device_id=DEVICE):
    return f"/api/v1/devices/{device_id}/stats"


def heartbeat(sent_at, device_id=DEVICE):
    return heartbeat_url(device_id), {"sent_at": sent_at}


def upload(upload_time, sent_at=SENT_AT, device_id=DEVICE, **more_fields):
    return stats_url(device_id), {"sent_at": sent_at, "upload_time": upload_time, **more_fields}


def minute_of_day(minute):
    """A sent_at that many minutes into the simulated day: minute_of_day(3) is 10:03."""
    return minute_to_rfc3339(utc_minute("2024-01-01T10:00:00Z") + minute)


def send(client, *requests):
    """POST each (path, body), asserting the 204: a test never builds on a refused write."""
    for path, body in requests:
        response = client.post(path, json=body)
        assert response.status_code == 204, (path, body, response.get_json())


def send_day(client, telemetry):
    send(client, *((event.path, event.body) for event in telemetry))


def devices_file(tmp_path, *device_ids, name="devices.csv"):
    """A devices file listing device_ids, quoted as CSV needs."""
    path = tmp_path / name
    with path.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file).writerows([["device_id"], *([device_id] for device_id in device_ids)])
    return path


# --- What the database holds --------------------------------------------------------------


def query(app, statement, arguments=()):
    """The rows of one SQL statement on the app's database, on a connection of its own."""
    # closing(): sqlite3's own `with` commits or rolls back but leaves the connection open.
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        return db.execute(statement, arguments).fetchall()


def stored(app, tables=("devices", "online_hours", "uploads", "outages", "alerts")):
    """What the database holds, to show that a rejected request changed nothing."""
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}


def stored_minutes(app, device_id=DEVICE):
    """The online minutes stored for a device, from the bits of its hours."""
    hours = query(app, "SELECT hour, minutes FROM online_hours JOIN devices USING (device_key)"
                       " WHERE device_id = ? ORDER BY hour", (device_id,))
    return [hour * 60 + bit for hour, bits in hours for bit in range(60) if bits >> bit & 1]


def stored_uploads(app, device_id=DEVICE):
    """(number, sent_at in UTC seconds, upload_time_ns) of a device's stored uploads."""
    return query(app, "SELECT number, sent_at, upload_time_ns FROM uploads JOIN devices USING (device_key)"
                      " WHERE device_id = ? ORDER BY number", (device_id,))


# --- Who is down, by a clock the test moves -----------------------------------------------


class WallClock:
    """fleetmon's wall clock, now_ms(), as a test sets it: 2024-01-01T10:04:00Z to start
    with; in every module that reads it."""

    def __init__(self, monkeypatch, ms=1_704_103_440_000):
        self.ms = ms
        for module in (fleetmon, fleet, housekeeping):
            monkeypatch.setattr(module, "now_ms", self.now_ms)

    def now_ms(self):
        return self.ms


class Watched:
    """A watch on who is down, on a monotonic clock (`now`) that the test moves with
    check_after(); `lines` are what it told."""

    def __init__(self, db, down_after, now):
        self.db, self.now, self.lines = db, now, []
        self.watch = status.Watch(db, down_after, now, announce=self.lines.append)

    def heard(self, device_id, heard_at_ms):
        self.watch.heard(device_id, heard_at_ms, self.now)


@contextmanager
def watching(app, down_after=60, now=1_000.0):
    """A Watch on app's database, heard by its requests, as the housekeeping has it."""
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        watched = Watched(db, down_after, now)
        app.extensions["fleetmon.heard"].append(watched.heard)
        try:
            yield watched
        finally:
            app.extensions["fleetmon.heard"].remove(watched.heard)


def check_after(watched, seconds):
    """Move the watch's clock on, check and tell, as a round of the housekeeping does:
    how many devices it declared down."""
    watched.now += seconds
    declared = watched.watch.check(watched.db, watched.now, fleetmon.now_ms())
    watched.watch.tell_changes(watched.db)
    return declared


def device_json(client, device_id=DEVICE):
    response = client.get(f"/api/v1/devices/{device_id}")
    assert response.status_code == 200
    return response.get_json()


# --- The fleet page -----------------------------------------------------------------------


def fleet_page(client, query_string=""):
    response = client.get(f"/{query_string}", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def listed_ids(page):
    """The device ids of the page's rows, in order."""
    return [html.unescape(device_id)
            for device_id in re.findall(r'<th scope="row"><a href="[^"]*"><code>([^<]*)</code>', page)]


def summary(page):
    """The fleet page's summary, as {term: value}."""
    return dict(re.findall(r"<dt>([^<]*)</dt><dd>([^<]*)</dd>", page))


def strips(page):
    """The online strips of a page, as (label, from, to, quarters, cell minutes)."""
    return re.findall(r'<div class="strip" role="group" aria-label="([^"]*)" title="[^"]*"\s+'
                      r'data-from="([^"]*)" data-to="([^"]*)" data-quarters="([0-9a-f]*)"\s+'
                      r'data-cell-minutes="(\d+)"></div>', page)


# --- fleetmon on waitress -----------------------------------------------------------------


def http_request(connection, method, path, body=None, headers=None):
    connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
    response = connection.getresponse()
    return response.status, response.read()


@contextmanager
def running(server):
    """Run a waitress server in a thread, and stop it cleanly after."""
    loop = threading.Thread(target=server.run, name="waitress loop")
    loop.start()
    try:
        yield server
    finally:
        # The worker first, so that no task writes to a closed channel; then the sockets,
        # closed by the loop itself between two select() calls (closed from here, they could
        # vanish under a select() still watching them). With no socket left, the loop returns.
        server.task_dispatcher.shutdown()
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        loop.join(timeout=30)
        assert not loop.is_alive(), "waitress's loop did not stop"


def fleetmon_server(app, **settings):
    """fleetmon's own waitress server for app on a free loopback port, with fleetmon's
    settings or these."""
    return connections.create_server(app, fleetmon.listen("127.0.0.1", 0), **settings)


@contextmanager
def waitress_server(app, **settings):
    """fleetmon's own waitress server for app, running; yields its port."""
    with running(fleetmon_server(app, **settings)) as server:
        yield server.effective_port


def read_to_end(sock):
    """What a socket receives until the server closes it."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def raw_exchange(port, data):
    """Send raw bytes on a new connection, and what comes back until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        return read_to_end(sock)


def unused_port():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


def fleetmon_command(*args):
    return [sys.executable, str(HERE / "fleetmon.py"), *map(str, args)]


@contextmanager
def server_process(*args, timeout=60, env=None):
    """`python fleetmon.py *args`, until it prints where it listens; killed after.

    Yields the process, its port, what it printed, and wait_for(text), which reads on to
    the next line with text in it. A thread reads the lines into a queue, whose get() can
    time out where a pipe's readline() cannot (Windows has no select() on pipes).
    """
    process = subprocess.Popen(fleetmon_command(*args), stdout=subprocess.PIPE, text=True, env=env)
    lines = queue.Queue()

    def read_lines():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # the end of its output

    reader = threading.Thread(target=read_lines, name="server output")
    reader.start()
    printed = []

    def wait_for(text):
        while True:
            try:
                printed.append(lines.get(timeout=timeout))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {timeout} s: {printed}")
            assert printed[-1] is not None, f"the server stopped before it printed {text!r}: {printed}"
            if text in printed[-1]:
                return printed[-1]

    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", wait_for("listening on")).group(1))
        yield process, port, printed, wait_for
    finally:
        process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean shutdown
        process.wait()
        reader.join()
        process.stdout.close()


# --- Servers that are not fleetmon --------------------------------------------------------

STOP = object()  # FakeServer's answer: stop listening, then drop every connection, as a server stopped


def http_answer(status, body=b"", headers=()):
    """An HTTP/1.1 answer with a JSON body, or a 204; headers as (name, value) pairs."""
    more = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if status == 204:
        return f"HTTP/1.1 204 No Content\r\n{more}\r\n".encode()
    head = (f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n{more}"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def read_requests(reader):
    """(method, path) of each request read from a connection, until the client closes it."""
    while request_line := reader.readline():
        method, path, _ = request_line.decode().split(" ", 2)
        length = 0
        while (header := reader.readline()).strip():
            name, _, value = header.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        reader.read(length)
        yield method, path


class FakeServer:
    """A loopback server that answers each request it reads with what answer(method, path)
    gives: bytes (b"" closes the connection unanswered), an iterable of bytes, or STOP.
    A thread for each connection; leaving stops it, joining all.

    The accepting thread waits in select() on the listening socket and on one end of a
    socket pair made with the server, through which stop() wakes it: stopping needs no
    connection to the listening socket, which a client's could beat to it.
    """

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.wake, self.woken = socket.socketpair()
        self.stopping, self.stopped, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.accept, name="fake server")]

    def __enter__(self):
        self.threads[0].start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        self.wake.close()
        self.woken.close()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a connection was left open"

    def accept(self):
        with self.listener:  # closed as it stops: a client connecting after is refused
            while True:
                ready, _, _ = select.select([self.listener, self.woken], [], [])
                if self.stopping.is_set():
                    break
                if self.listener in ready:
                    connection, _ = self.listener.accept()
                    self.threads.append(threading.Thread(target=self.serve, args=(connection,),
                                                         name="fake connection"))
                    self.threads[-1].start()
        self.stopped.set()

    def stop(self):
        """Stop listening: wake the accepting thread, and wait for it to close the listener."""
        with self.lock:
            if not self.stopping.is_set():
                self.stopping.set()
                self.wake.sendall(b"x")
        self.stopped.wait()

    def serve(self, connection):
        with connection, connection.makefile("rb") as reader, suppress(ConnectionError):
            for method, path in read_requests(reader):
                self.requests.append((method, path))
                answer = STOP if self.stopping.is_set() else self.answer(method, path)
                if answer is STOP:
                    self.stop()
                if answer is STOP or answer == b"":
                    return
                for chunk in [answer] if isinstance(answer, bytes) else answer:
                    connection.sendall(chunk)


@contextmanager
def alert_receiver():
    """A webhook receiver on a free loopback port; yields (url, the alerts it took, an
    event set at each one)."""
    taken, arrived = [], threading.Event()

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            taken.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            arrived.set()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}/hook", taken, arrived
        finally:
            server.shutdown()
            thread.join()


# --- Starting fleetmon --------------------------------------------------------------------


def start_with(capsys, *args):
    """fleetmon's exit status and what it printed on stderr, for args with which it does
    not start: an argparse refusal (exit status 2) or a StartupError (1)."""
    try:
        status = fleetmon.main(list(map(str, args)))
    except SystemExit as exit_:
        status = exit_.code
    printed = capsys.readouterr()
    assert printed.out == ""
    return status, printed.err


def get(port, path, headers=None):
    """(status, body) of one GET on a connection of its own."""
    with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
        return http_request(connection, "GET", path, headers=headers)
