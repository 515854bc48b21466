"""fleetmon's tests: the pure maths, every answer of the HTTP API as the spec's examples,
storage, and fleetmon's own waitress server under concurrent load and kill -9.

Run with ``python -m pytest``.
"""

import csv
import html
import http.server
import itertools
import json
import os
import queue
import random
import re
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection, HTTPException
from pathlib import Path

import prometheus_client
import pytest
import waitress
from flask import Flask, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from waitress import wasyncore

import fleetmon
import simulator
from fleetmon import (
    INT64_MAX,
    StartupError,
    create_app,
    go_duration,
    load_device_ids,
    mean_ns,
    minute_to_rfc3339,
    uptime_percent,
    utc_minute,
)
from simulator import PUBLISHED_DAYS, simulated_day

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
# module registers its profiles.) No deadline in either: it is a timing assert.
SHARED_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("repeatable", derandomize=True, max_examples=150, **SHARED_SETTINGS)
settings.register_profile("explore", max_examples=1_500, **SHARED_SETTINGS)
settings.load_profile(os.environ.get("FLEETMON_HYPOTHESIS", "repeatable"))

# A thread that dies of an exception (waitress's loop, a client) fails its test, not just warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


# --- Fixtures and helpers -----------------------------------------------------------------


@contextmanager
def open_app(database, devices_csv=DEVICES_CSV):
    """create_app, closed after: whoever creates an app closes its connections."""
    app = create_app(database=database, devices_csv=devices_csv)
    try:
        yield app
    finally:
        fleetmon.close_storage(app)


@pytest.fixture
def app(tmp_path):
    with open_app(tmp_path / "fleetmon.db") as app:
        app.config["TESTING"] = True
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


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


def devices_file(tmp_path, *device_ids):
    """A devices file listing device_ids, quoted as CSV needs."""
    path = tmp_path / "devices.csv"
    with path.open("w", encoding="utf-8", newline="") as file:
        csv.writer(file).writerows([["device_id"], *([device_id] for device_id in device_ids)])
    return path


def query(app, statement, arguments=()):
    """The rows of one SQL statement on the app's database, on a connection of its own."""
    # closing(): sqlite3's own `with` commits or rolls back but leaves the connection open.
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        return db.execute(statement, arguments).fetchall()


def stored(app, tables=("devices", "online_hours", "uploads", "outages", "alerts")):
    """What the database holds, to show that a rejected request changed nothing."""
    return {table: query(app, f"SELECT * FROM {table} ORDER BY 1, 2") for table in tables}


def stored_minutes(app, device_id=DEVICE):
    """The online minutes stored for a device, from the bits of its hours."""
    hours = query(app, "SELECT hour, minutes FROM online_hours JOIN devices USING (device_key)"
                       " WHERE device_id = ? ORDER BY hour", (device_id,))
    return [hour * 60 + bit for hour, bits in hours for bit in range(60) if bits >> bit & 1]


def stored_uploads(app, device_id=DEVICE):
    """(number, sent_at in UTC seconds, upload_time_ns) of a device's stored uploads."""
    return query(app, "SELECT number, sent_at, upload_time_ns FROM uploads JOIN devices USING (device_key)"
                      " WHERE device_id = ? ORDER BY number", (device_id,))


def http_request(connection, method, path, body=None):
    connection.request(method, path, body=None if body is None else json.dumps(body))
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


@contextmanager
def waitress_server(app):
    """fleetmon's own waitress server for app on a free loopback port; yields the port."""
    with running(fleetmon.create_server(app, "127.0.0.1", 0)) as server:
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


@contextmanager
def server_process(*args, timeout=60):
    """`python fleetmon.py *args`, until it prints where it listens; killed after.

    Yields the process, its port, what it printed, and wait_for(text), which reads on to
    the next line with text in it. A thread reads the lines into a queue, whose get() can
    time out where a pipe's readline() cannot (Windows has no select() on pipes).
    """
    process = subprocess.Popen([sys.executable, str(HERE / "fleetmon.py"), *args], stdout=subprocess.PIPE, text=True)
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


# --- Maths: Go's time.Duration.String() ---------------------------------------------------

# Each right-hand side is what Go prints for time.Duration(left).String() (checked
# against go1.19), the vendor's simulator's published means included.
GO_DURATIONS = [
    (0, "0s"), (1, "1ns"), (999, "999ns"),
    (1_000, "1\u00b5s"),  # the micro sign, as Go writes it, not the Greek mu U+03BC
    (1_500, "1.5µs"), (1_001, "1.001µs"), (999_999, "999.999µs"),
    (1_000_000, "1ms"), (1_100_000, "1.1ms"), (999_999_999, "999.999999ms"),
    (1_000_000_000, "1s"), (1_000_000_001, "1.000000001s"), (1_500_000_000, "1.5s"), (59_999_999_999, "59.999999999s"),
    (60_000_000_000, "1m0s"), (61_000_000_000, "1m1s"), (3_599_999_999_999, "59m59.999999999s"),
    (3_600_000_000_000, "1h0m0s"), (3_723_000_000_001, "1h2m3.000000001s"), (3_723_100_000_000, "1h2m3.1s"),
    (90_000_000_000_000, "25h0m0s"), (2**53 + 1, "2501h59m59.254740993s"), (INT64_MAX, "2562047h47m16.854775807s"),
    (-1, "-1ns"), (-1_500, "-1.5µs"), (-3_600_000_000_000, "-1h0m0s"), (-(2**63), "-2562047h47m16.854775808s"),
    *((published.mean_ns, published.avg_upload_time) for published in PUBLISHED_DAYS.values()),
]


@pytest.mark.parametrize(("ns", "text"), GO_DURATIONS)
def test_format_duration_matches_go(ns, text):
    assert go_duration(ns) == text


@pytest.mark.parametrize(
    ("total_ns", "count", "mean"),
    [(0, 0, 0), (7, 1, 7), (10, 3, 3), (11, 3, 3), (18_789_337_913_437, 100, 187_893_379_134),
     (INT64_MAX, 1, INT64_MAX), (INT64_MAX, 2, 4_611_686_018_427_387_903)],
)
def test_mean_ns_truncates(total_ns, count, mean):
    assert mean_ns(total_ns, count) == mean


# --- Maths: uptime and sent_at ------------------------------------------------------------


@pytest.mark.parametrize(
    ("online", "first", "last", "uptime"),
    [
        (0, None, None, 0.0),  # uploads only
        (1, 1000, 1000, 100.0),  # one online minute
        (479, 0, 480, 99.79166666666667),  # the span is exclusive (not 479 / 481); not rounded
        (446, 0, 480, 446 / 480 * 100), (480, 0, 480, 100.0), (2, 5, 6, 100.0),
        (481, 0, 480, 100.0),  # online in every minute of the span: capped
        (2, -10, 50, 2 / 60 * 100),  # minutes before 1970 are fine
    ],
)
def test_uptime_percent(online, first, last, uptime):
    assert uptime_percent(online, first, last) == uptime


@pytest.mark.parametrize(
    ("sent_at", "minute"),
    [
        ("1970-01-01T00:00:00Z", 0), ("1970-01-01T00:01:00Z", 1), ("1969-12-31T23:59:59Z", -1),
        ("1970-01-01T00:00:59.999999999Z", 0),  # seconds are dropped, not rounded
        # offsets are normalised to UTC
        ("1970-01-01T01:00:00+01:00", 0), ("1969-12-31T19:00:30-05:00", 0), ("1970-01-01T05:30:00+05:30", 0),
        ("1970-01-01T00:00:00-00:00", 0),
        ("2024-01-01T10:04:00Z", 28_401_724), ("2024-01-01T10:04:00.5Z", 28_401_724),
        ("2024-01-01T10:04:00.123456789+00:00", 28_401_724), ("2024-02-29T00:00:00Z", 28_486_080),  # leap day
        ("0001-01-01T00:00:00Z", -1_035_593_280), ("9999-12-31T23:59:59Z", 4_223_371_679),
    ],
)
def test_utc_minute_and_back(sent_at, minute):
    assert utc_minute(sent_at) == minute
    assert utc_minute(minute_to_rfc3339(minute)) == minute


def test_a_minute_is_written_as_the_pages_script_reads_it():
    assert minute_to_rfc3339(fleetmon.FIRST_MINUTE) == "0001-01-01T00:00:00Z"  # four digits, as Date.parse wants
    assert minute_to_rfc3339(-1) == "1969-12-31T23:59:00Z"


@pytest.mark.parametrize(
    "sent_at",
    [
        "", "2024-01-01", "10:04:00Z", "+2024-01-01T10:04:00Z", "Mon, 01 Jan 2024 10:04:00 GMT", "1704103440",
        "2024-01-01T10:04:00",  # no offset
        "2024-01-01 10:04:00Z",  # a space instead of T
        "2024-01-01t10:04:00z",  # Go and JSON Schema want upper case too
        "2024-01-01T10:04Z", "2024-01-01T10:04:00.Z",
        "2024-01-01T10:04:00.1234567890Z",  # more than nanoseconds
        "2024-01-01T10:04:00+0100", "2024-01-01T10:04:00+01", "2024-01-01T10:04:00+24:00", "2024-01-01T10:04:00+01:60",
        "2024-13-01T10:04:00Z", "2024-02-30T10:04:00Z", "2024-01-01T24:00:00Z", "2024-01-01T10:60:00Z",
        "2023-02-29T10:04:00Z",  # not a leap year
        "2024-01-01T10:04:60Z",  # leap seconds: Go rejects them too
        "0000-01-01T00:00:00Z",  # there is no year 0
        "0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01",  # years 0 and 10000 in UTC
        "2024-01-01T10:04:00Z\n", " 2024-01-01T10:04:00Z",
        "２０２４-01-01T10:04:00Z",  # digits, but not ASCII ones
    ],
)
def test_utc_minute_rejects(sent_at):
    with pytest.raises(ValueError):
        utc_minute(sent_at)


# --- Devices file -------------------------------------------------------------------------

NO_DEVICE_ID_COLUMN = "devices file {path} has no device_id column in its first line"
NO_DEVICES = "devices file {path} lists no devices under device_id"


@pytest.mark.parametrize(
    ("content", "outcome"),
    [
        # What spreadsheets write: a byte-order mark, spaces, blank lines, short and long rows, a repeated id.
        (b"\xef\xbb\xbf name , device_id \r\nA, aa-01 \r\n\r\nB, bb-02 ,x\r\nC,aa-01\r\nD,\r\nE\r\n", ["aa-01", "bb-02"]),
        (None, "cannot read devices file {path}: No such file or directory"),
        (b"device_id\n\xff\xfe\n", "devices file {path} is not UTF-8 text"),
        (b"", NO_DEVICE_ID_COLUMN),
        (b"id\n60-6b-44-84-dc-64\n", NO_DEVICE_ID_COLUMN),
        (b"device_id\n", NO_DEVICES),
        (b"name,device_id\nA, \n\nB\n", NO_DEVICES),
        (b"device_id\n\n  \n", NO_DEVICES),
    ],
)
def test_fleetmon_and_the_simulator_read_a_devices_file_alike(tmp_path, content, outcome):
    path = tmp_path / "devices.csv"
    if content is not None:
        path.write_bytes(content)

    def read(read_device_ids, error):
        try:
            return sorted(read_device_ids(path))
        except error as raised:
            return str(raised)

    expected = outcome.format(path=path) if isinstance(outcome, str) else outcome
    assert read(load_device_ids, StartupError) == expected
    assert read(simulator.read_device_ids, simulator.SimulatorError) == expected


@pytest.mark.parametrize(("content", "line", "device_id"),
                         [(b"device_id\naa-01\n\nbb/02\n", 4, "bb/02"), (b"device_id\n.\n", 2, "."),
                          (b"device_id\naa-01\n ..\n", 3, "..")])
def test_fleetmon_refuses_a_device_id_no_url_can_carry(tmp_path, content, line, device_id):
    path = tmp_path / "devices.csv"
    path.write_bytes(content)
    with pytest.raises(StartupError) as refused:
        load_device_ids(path)
    assert str(refused.value) == f"devices file {path}, line {line}: no URL can carry the device id {device_id!r}"


def test_a_bad_devices_file_stops_the_start_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.csv"
    run = subprocess.run(
        [sys.executable, str(HERE / "fleetmon.py"), "--devices", str(missing), "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"fleetmon: cannot read devices file {missing}: No such file or directory\n"


# --- HTTP: the three contract endpoints ---------------------------------------------------


def test_telemetry_is_an_empty_204_and_stored_in_utc(app, client):
    for path, body in (heartbeat("2024-01-01T10:04:31+02:00"),
                       upload(187_893_379_134, "2024-01-01T10:04:00.123456789-05:00")):
        response = client.post(path, json=body)
        assert (response.status_code, response.data) == (204, b"")
        assert "Content-Type" not in response.headers
    assert stored_minutes(app) == [utc_minute("2024-01-01T08:04:00Z")]  # the upload's sent_at is no heartbeat
    assert stored_uploads(app) == [(1, datetime(2024, 1, 1, 15, 4, tzinfo=UTC).timestamp(), 187_893_379_134)]


def test_stats_are_an_empty_204_until_the_device_itself_sends_something(client):
    send(client, upload(5, device_id=OTHER_DEVICE))
    response = client.get(stats_url())
    assert (response.status_code, response.data) == (204, b"")
    send(client, upload(5))
    assert client.get(stats_url()).status_code == 200


@pytest.mark.parametrize(
    ("telemetry", "stats"),
    [
        pytest.param(
            [heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:01:00Z"), heartbeat("2024-01-01T10:04:00Z"),
             upload(1_000), upload(2_001)],
            {"uptime": 75.0, "avg_upload_time": "1.5µs"},
            id="uptime is online minutes over the span, the mean is truncated and printed as Go does",
        ),
        pytest.param(
            [heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:00:59.999Z"),
             heartbeat("2024-01-01T11:00:30+01:00"), heartbeat("2024-01-01T10:10:00Z"),
             heartbeat("2024-01-01T10:10:00Z")],
            {"uptime": 2 / 10 * 100, "avg_upload_time": "0s"},
            id="a retried heartbeat, or another in the same UTC minute, counts once",
        ),
        pytest.param(
            [heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:04:00Z"),
             upload(60_000_000_000, "2024-01-01T12:00:00Z"), upload(0, "2024-01-01T10:02:00Z")],
            {"uptime": 2 / 4 * 100, "avg_upload_time": "30s"},
            id="an upload's sent_at is no heartbeat",
        ),
        pytest.param([heartbeat("2024-01-01T10:00:00Z")], {"uptime": 100.0, "avg_upload_time": "0s"},
                     id="heartbeats only: one online minute is 100, the mean 0s"),
        pytest.param([upload(3_723_000_000_001)], {"uptime": 0.0, "avg_upload_time": "1h2m3.000000001s"},
                     id="uploads only: uptime 0"),
        pytest.param([upload(0)], {"uptime": 0.0, "avg_upload_time": "0s"}, id="the least upload_time, 0"),
        pytest.param([upload(INT64_MAX)], {"uptime": 0.0, "avg_upload_time": "2562047h47m16.854775807s"},
                     id="the greatest upload_time, 2^63 - 1"),
        pytest.param([upload(7, firmware={"v": [1, 2]})], {"uptime": 0.0, "avg_upload_time": "7ns"},
                     id="unknown fields are ignored"),
    ],
)
def test_stats(client, telemetry, stats):
    send(client, *telemetry)
    response = client.get(stats_url())
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == stats


@pytest.mark.parametrize("order", ["as sent", "reversed", "shuffled"])
def test_arrival_order_does_not_matter(client, order):
    """The simulator's day, retries and a few out of order included, gives its published
    stats whatever order it arrives in; uptime at full precision, as a JSON number."""
    day = simulated_day(DEVICE)
    send_day(client, {"as sent": day, "reversed": day[::-1], "shuffled": random.Random(0).sample(day, len(day))}[order])
    published = PUBLISHED_DAYS[DEVICE]
    assert client.get(stats_url()).get_json() == {"uptime": published.heartbeats / 480 * 100,
                                                  "avg_upload_time": published.avg_upload_time}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_the_body_is_json_whatever_its_content_type(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(heartbeat_url(), data='{"sent_at": "2024-01-01T10:04:00Z"}', headers=headers)
    assert response.status_code == 204


# --- HTTP: errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_id",
    ["unknown", "60-6b-44-84-dc-6", "60-6B-44-84-DC-64", " 60-6b-44-84-dc-64", "'; DROP TABLE device_stats; --",
     "60-6b-44-84-dc-64' OR '1'='1", "%", "_" * 17, "x" * 5_000, "é", "\x00"],
)
def test_an_unknown_device_is_404_before_the_body_is_read(client, device_id):
    for method, path in (("POST", heartbeat_url(device_id)), ("POST", stats_url(device_id)),
                         ("GET", stats_url(device_id)), ("GET", f"/debug/stats/{device_id}"),
                         ("OPTIONS", heartbeat_url(device_id)), ("OPTIONS", stats_url(device_id))):
        response = client.open(path, method=method, data=b"not json at all")
        assert (response.status_code, response.get_json()) == (404, {"msg": "device not found"})


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/api/v1/devices/60-6b-44-84-dc-64/heartbeat", "GET", "OPTIONS, POST"),
        ("/api/v1/devices/60-6b-44-84-dc-64/heartbeat", "PUT", "OPTIONS, POST"),
        ("/api/v1/devices/unknown/heartbeat", "DELETE", "OPTIONS, POST"),  # 405 before 404
        ("/api/v1/devices/60-6b-44-84-dc-64/stats", "PATCH", "GET, HEAD, OPTIONS, POST"),
        ("/openapi.json", "POST", "GET, HEAD, OPTIONS"),
        ("/docs/", "POST", "GET, HEAD, OPTIONS"),
        ("/docs/", "DELETE", "GET, HEAD, OPTIONS"),
    ],
)
def test_a_wrong_method_is_405_with_allow(client, path, method, allow):
    response = client.open(path, method=method, data=b"not json")
    assert response.status_code == 405
    assert response.get_json() == {"msg": "The method is not allowed for the requested URL."}
    assert sorted(response.headers["Allow"].split(", ")) == allow.split(", ")


# A path with "//" is an unknown path too, not a redirect to the path without it.
@pytest.mark.parametrize(
    "path",
    ["/api/v1/device", "/api/v1/devices/60-6b-44-84-dc-64/uptime", "/api/v1/devices/60-6b/44-84-dc-64/stats",
     "/api/v1//devices/60-6b-44-84-dc-64/stats", "/api/v1/devices//stats", "/api/v2/x", "/favicon.ico"],
)
def test_an_unknown_path_is_404_json(client, path):
    response = client.get(path)
    assert (response.status_code, response.content_type) == (404, "application/json")
    assert response.get_json()["msg"]


def assert_refused(app, client, path, body, status, msg):
    """POST body (bytes as they are, anything else as JSON): answered status and
    {"msg": msg}, and the database as it was."""
    before = stored(app)
    response = client.post(path, data=body if isinstance(body, bytes) else json.dumps(body))
    assert (response.status_code, response.get_json()) == (status, {"msg": msg})
    assert stored(app) == before


def refusals(paths, msg, *bodies):
    return [pytest.param(path, body, msg, id=f"{path.rsplit('/', 1)[1]} {body!r:.80}")
            for path in paths for body in bodies]


BOTH = (heartbeat_url(), stats_url())


@pytest.mark.parametrize(
    ("path", "body", "msg"),
    [
        *refusals(BOTH, "body is not valid JSON", b"", b"{", b"sent_at=2024-01-01T10:04:00Z", b"\xff\xfe{}",
                  '{"sent_at": "2024-01-01T10:04:00Z"}'.encode("utf-16"),
                  b'{"sent_at": "2024-01-01T10:04:00Z", "x": NaN}', b'{"sent_at": "2024-01-01T10:04:00Z"} {}'),
        *refusals(BOTH, "body is nested too deeply", b"[" * 60_000),
        *refusals(BOTH, "body has an integer of more than 4300 digits",
                  b'{"sent_at": "2024-01-01T10:04:00Z", "n": ' + b"9" * 4_301 + b"}"),
        *refusals(BOTH, "body must be a JSON object", b"null", b"[]", b'"2024-01-01T10:04:00Z"'),
        *refusals(BOTH, "sent_at is required", {}, {"sent_At": SENT_AT}),
        *refusals(BOTH, "sent_at must be an RFC 3339 date-time with an offset, like 2024-01-01T10:04:00Z",
                  *({"sent_at": value, "upload_time": 1} for value in
                    [None, 1704103440, True, [SENT_AT], "2024-01-01T10:04:00", "2024-01-01", "yesterday"])),
        *refusals([stats_url()], "upload_time is required", {"sent_at": SENT_AT}),
        *refusals([stats_url()], "upload_time must be an integer number of nanoseconds from 0 to 9223372036854775807",
                  *({"sent_at": SENT_AT, "upload_time": value} for value in
                    [True, False, 5.0, 1e3, "5", None, -1, INT64_MAX + 1, 10**400, [5], {}])),
    ],
)
def test_a_bad_body_is_400_naming_what_is_wrong_and_stores_nothing(app, client, path, body, msg):
    assert_refused(app, client, path, body, 400, msg)


def test_an_upload_that_would_overflow_the_total_is_409_and_stores_nothing(app, client):
    send(client, upload(INT64_MAX - 1))
    assert_refused(app, client, stats_url(), {"sent_at": SENT_AT, "upload_time": 2}, 409,
                   "this upload_time would overflow the device's total upload time (9223372036854775807 ns); "
                   "nothing was stored")
    send(client, upload(1))
    assert client.get(stats_url()).get_json()["avg_upload_time"] == go_duration(INT64_MAX // 2)


@pytest.mark.parametrize("path", BOTH)
def test_a_body_over_64_kib_is_413_and_stores_nothing(app, client, path):
    def body_of_size(size):
        prefix = b'{"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1, "padding": "'
        return prefix + b"x" * (size - len(prefix) - 2) + b'"}'

    assert client.post(path, data=body_of_size(64 * 1024)).status_code == 204
    assert_refused(app, client, path, body_of_size(64 * 1024 + 1), 413,
                   "The data value transmitted exceeds the capacity limit.")


def test_an_unexpected_error_is_500_json_with_the_details_in_the_log_only(app, client, caplog):
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as in production, not raise into the test
    query(app, "DROP TABLE uploads")
    before = stored(app, ("devices", "online_hours"))
    response = client.post(stats_url(), json={"sent_at": SENT_AT, "upload_time": 5})
    assert response.status_code == 500
    assert response.get_json() == {
        "msg": "The server encountered an internal error and was unable to complete your request. "
               "Either the server is overloaded or there is an error in the application."
    }
    assert stored(app, ("devices", "online_hours")) == before
    assert "no such table: main.uploads" in caplog.text


# --- Hostile input ------------------------------------------------------------------------

# Each example reuses the test's app on purpose: the database grows, and every example
# must leave it unchanged unless it was answered 204.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Mostly valid RFC 3339, each part sometimes just out of range or of the wrong form.
near_valid_sent_at = st.builds(
    "{:04d}-{:02d}-{:02d}{}{:02d}:{:02d}:{:02d}{}{}".format,
    st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32), st.sampled_from("Tt "),
    st.integers(0, 24), st.integers(0, 60), st.integers(0, 60),
    st.sampled_from(["", ".5", ".123456789", ".1234567890"]),
    st.sampled_from(["Z", "z", ""])
    | st.builds("{}{:02d}:{:02d}".format, st.sampled_from("+-"), st.integers(0, 24), st.integers(0, 60)),
)
bodies = st.dictionaries(
    st.sampled_from(["sent_at", "upload_time"]) | st.text(max_size=8),
    json_values | near_valid_sent_at | st.integers(min_value=-(2**64), max_value=2**64),
    max_size=4,
)


def assert_answered_safely(app, response, before):
    assert response.status_code in (204, 400, 404, 409, 413)
    if response.status_code == 204:
        assert response.data == b""
    else:
        assert response.content_type == "application/json"
        assert response.get_json()["msg"]
        assert stored(app) == before


@pytest.mark.parametrize("path", BOTH)
@given(body=st.binary(max_size=2_000) | st.builds(json.dumps, json_values | bodies))
def test_any_body(app, client, path, body):
    before = stored(app)
    assert_answered_safely(app, client.post(path, data=body), before)


# A "/" is no part of an id but a path separator: test_an_unknown_path_is_404_json. The
# listed ids are left out: Hypothesis draws strings from fleetmon.py's source too.
@given(device_id=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/"), min_size=1)
       .filter(lambda text: text not in PUBLISHED_DAYS))
def test_any_device_id(app, client, device_id):
    before = stored(app)
    quoted = urllib.parse.quote(device_id, safe="")
    for method, path in (("POST", heartbeat_url(quoted)), ("POST", stats_url(quoted)), ("GET", stats_url(quoted)),
                         ("GET", f"/debug/stats/{quoted}"), ("GET", f"/api/v1/devices/{quoted}"),
                         ("GET", f"/devices/{quoted}")):
        response = client.open(path, method=method, json={"sent_at": SENT_AT, "upload_time": 1}, headers=HTML)
        assert (response.status_code, response.content_type) == (404, "application/json")
    assert stored(app) == before


def minute_by_strptime(sent_at):
    """The UTC minute of an accepted sent_at, worked out apart from utc_minute."""
    local = datetime.strptime(sent_at[:16], "%Y-%m-%dT%H:%M")
    offset = timedelta(0)
    if not sent_at.endswith("Z"):
        offset = timedelta(hours=int(sent_at[-5:-3]), minutes=int(sent_at[-2:]))
        offset = -offset if sent_at[-6] == "-" else offset
    return (local - offset - datetime(1970, 1, 1)) // timedelta(minutes=1)


@given(sent_at=st.text() | near_valid_sent_at)
def test_any_sent_at(app, client, sent_at):
    before = stored(app)
    response = client.post(heartbeat_url(), json={"sent_at": sent_at})
    assert response.status_code in (204, 400)
    assert_answered_safely(app, response, before)
    if response.status_code == 204:
        assert minute_by_strptime(sent_at) in stored_minutes(app)


query_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30) | st.from_regex(r"-?\d{1,5000}", fullmatch=True)


@given(path=st.sampled_from(["/", "/api/v1/devices", "/debug/devices", f"/devices/{DEVICE}"]),
       arguments=st.dictionaries(st.sampled_from(["page", "limit", "after", "status", "q"]), query_text, max_size=3),
       accept=st.sampled_from(["text/html", "application/json"]))
def test_no_query_argument_reaches_a_500(client, path, arguments, accept):
    response = client.get(path, query_string=arguments, headers={"Accept": accept})
    assert response.status_code in (200, 400), (path, arguments, response.status_code)
    if response.status_code == 400:
        assert set(response.get_json()) == {"msg"}


# --- Storage ------------------------------------------------------------------------------


def test_the_aggregates_match_the_raw_rows_and_a_restart_gives_the_same_stats(app, client):
    send_day(client, simulated_day(DEVICE)[:300])
    minutes, uploads = stored_minutes(app), stored_uploads(app)
    assert query(app, "SELECT online_minutes, first_minute, last_minute, upload_count, upload_total_ns FROM devices"
                      " WHERE device_id = ?", (DEVICE,)) == [
        (len(minutes), min(minutes), max(minutes), len(uploads), sum(upload[2] for upload in uploads))]
    with open_app(app.config["DATABASE"]) as restarted:  # schema.sql applied again
        assert restarted.test_client().get(stats_url()).get_json() == client.get(stats_url()).get_json()
        assert stored(restarted) == stored(app)


def test_concurrent_writers_never_see_database_is_locked(app):
    """As under `flask run`, a thread a request: writers wait their turn for SQLite's lock."""
    def write_day(device_id):
        client = app.test_client()
        for event in simulated_day(device_id)[:300]:
            assert client.post(event.path, json=event.body).status_code == 204
        return client.get(stats_url(device_id)).status_code

    with ThreadPoolExecutor(max_workers=5) as pool:
        assert list(pool.map(write_day, sorted(PUBLISHED_DAYS))) == [200] * 5


def test_a_start_writes_nothing_to_a_database_it_knows(tmp_path):
    """So that fleetmon starts on a full disk: it needs no room to grow the log."""
    database = tmp_path / "fleetmon.db"
    with open_app(database) as app:
        send(app.test_client(), heartbeat(SENT_AT))
    with closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = database.read_bytes()
        with open_app(database) as restarted:
            assert restarted.test_client().get(stats_url()).get_json() == {"uptime": 100.0, "avg_upload_time": "0s"}
            assert Path(f"{database}-wal").stat().st_size == 0
    assert database.read_bytes() == before


# --- A database error, a full disk --------------------------------------------------------


def read_only(database):
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def on_a_full_disk(database, connect=fleetmon.connect):  # the real one, not a test's stand-in
    db = connect(database)
    db.execute("PRAGMA max_page_count = 1")  # no more pages than it has: a write that needs one fails
    return db


@pytest.mark.parametrize(("broken_connect", "error"), [(read_only, "attempt to write a readonly database"),
                                                       (on_a_full_disk, "database or disk is full")])
def test_a_failed_write_is_a_500_logged_once_in_full_and_the_next_request_starts_afresh(
        app, client, monkeypatch, caplog, broken_connect, error):
    """As when the database file was read-only, or the disk full, and then mended."""
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer 500 as in production
    monkeypatch.setattr(fleetmon, "connect", broken_connect)
    hours = 0  # heartbeats, each in an hour (a row) of its own, until one is a 500
    while client.post(heartbeat_url(), json={"sent_at": minute_of_day(60 * hours)}).status_code == 204:
        hours += 1
        assert hours < 1_000, "the broken connection never failed"
    for hour in range(hours + 1, hours + 3):
        assert client.post(heartbeat_url(), json={"sent_at": minute_of_day(60 * hour)}).status_code == 500
    failures = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage() for record in failures] == [f"POST {heartbeat_url()} failed: OperationalError: {error}"] * 3
    assert [record.exc_info is not None for record in failures] == [True, False, False]
    monkeypatch.undo()
    send(client, heartbeat(minute_of_day(60 * hours)))
    assert len(stored_minutes(app)) == hours + 1


def test_the_write_ahead_log_is_cut_back_after_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(fleetmon, "WAL_SIZE_LIMIT_BYTES", 32 * 1024)
    with open_app(tmp_path / "fleetmon.db") as app:
        client = app.test_client()
        send(client, *(heartbeat(minute_of_day(60 * hour)) for hour in range(300)))
        wal = tmp_path / "fleetmon.db-wal"
        assert wal.stat().st_size > 32 * 1024
        with closing(fleetmon.connect(app.config["DATABASE"])) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # what the housekeeping does every few seconds
        send(client, heartbeat(minute_of_day(0)))  # the log restarts from its beginning, cut back
        assert wal.stat().st_size <= 32 * 1024


# --- Upgrading a database written by an earlier fleetmon ----------------------------------

# The layout of every fleetmon before schema versions (user_version 0): a row per online
# minute and per upload, each with the text id, the aggregates kept by triggers.
FIRST_LAYOUT = """
PRAGMA journal_mode = WAL;
CREATE TABLE heartbeat_minutes (device_id TEXT NOT NULL, minute INTEGER NOT NULL,
                                PRIMARY KEY (device_id, minute)) WITHOUT ROWID;
CREATE TABLE uploads (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, sent_at TEXT NOT NULL,
                      upload_time_ns INTEGER NOT NULL CHECK (upload_time_ns >= 0));
CREATE TABLE listed_devices (device_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE device_stats (device_id TEXT PRIMARY KEY, online_minutes INTEGER NOT NULL DEFAULT 0,
                           first_minute INTEGER, last_minute INTEGER, upload_count INTEGER NOT NULL DEFAULT 0,
                           upload_total_ns INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TRIGGER count_online_minute AFTER INSERT ON heartbeat_minutes BEGIN
    UPDATE device_stats SET online_minutes = online_minutes + 1,
        first_minute = min(coalesce(first_minute, NEW.minute), NEW.minute),
        last_minute = max(coalesce(last_minute, NEW.minute), NEW.minute)
    WHERE device_id = NEW.device_id;
END;
CREATE TRIGGER add_upload AFTER INSERT ON uploads BEGIN
    UPDATE device_stats SET upload_count = upload_count + 1, upload_total_ns = upload_total_ns + NEW.upload_time_ns
    WHERE device_id = NEW.device_id;
END;
"""


def first_layout_database(path, days):
    """A database as the first layout's fleetmon left it, holding days {device: [(path, body)]};
    the stats it gave."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(FIRST_LAYOUT)
        db.executemany("INSERT INTO device_stats (device_id) VALUES (?)", ((d,) for d in PUBLISHED_DAYS))
        db.executemany("INSERT INTO listed_devices (device_id) VALUES (?)", ((d,) for d in PUBLISHED_DAYS))
        for device_id, telemetry in days.items():
            for url, body in telemetry:
                if url.endswith("/heartbeat"):
                    db.execute("INSERT OR IGNORE INTO heartbeat_minutes VALUES (?, ?)",
                               (device_id, utc_minute(body["sent_at"])))
                else:
                    db.execute("INSERT INTO uploads (device_id, sent_at, upload_time_ns) VALUES (?, ?, ?)",
                               (device_id, body["sent_at"], body["upload_time"]))
        return {device_id: fleetmon.device_stats(fleetmon.Aggregates(*row))
                for device_id, *row in db.execute("SELECT * FROM device_stats")}


def everything_in(path):
    """The whole database, schema and rows, to show it was left as it was."""
    with closing(sqlite3.connect(path)) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        return (db.execute("PRAGMA user_version").fetchone(), db.execute("SELECT * FROM sqlite_schema").fetchall(),
                {table: db.execute(f"SELECT * FROM {table}").fetchall() for table in tables})


def definitions(path):
    """Every table, index, view and trigger of a database, as its SQL defines it."""
    with closing(sqlite3.connect(path)) as db:
        return sorted(db.execute("SELECT type, name, sql FROM sqlite_schema"))


FIRST_DEVICE = "26-9a-66-01-33-83"
ODD_DAYS = {  # uploads only, sent with offsets; heartbeats only, one before 1970; one minute alone
    DEVICE: [upload(7, "2024-01-01T12:04:59.999999999+02:00"), upload(INT64_MAX - 9, "2024-01-01T05:04:00-05:00"),
             upload(1, "2024-01-02T02:04:00.5+23:59"), upload(1, "2023-12-31T14:04:00-20:00")],
    OTHER_DEVICE: [heartbeat(sent_at, OTHER_DEVICE)
                   for sent_at in ("1969-12-31T23:59:00Z", "1970-01-01T00:00:00Z", "1970-01-01T01:30:00Z")],
    FIRST_DEVICE: [heartbeat(SENT_AT, FIRST_DEVICE)],
}
SIMULATED_DAYS = {device_id: [(event.path, event.body) for event in simulated_day(device_id)]
                  for device_id in PUBLISHED_DAYS}


@pytest.mark.parametrize("days", [SIMULATED_DAYS, ODD_DAYS], ids=["the simulator's day", "odd cases"])
def test_a_first_layout_database_is_upgraded_with_identical_stats(tmp_path, days):
    database = tmp_path / "old.db"
    before = first_layout_database(database, days)
    with open_app(database) as app:
        client = app.test_client()
        assert {device_id: client.get(stats_url(device_id)).get_json() for device_id in PUBLISHED_DAYS} == before
        assert re.fullmatch(rf"upgraded database {re.escape(str(database))} from schema version 0 to "
                            rf"{fleetmon.SCHEMA_VERSION}: [\d,]+ rows written in \d+\.\d s", app.config["UPGRADED"])
        for device_id, telemetry in days.items():  # the raw telemetry came along too
            minutes = {utc_minute(body["sent_at"]) for url, body in telemetry if url.endswith("/heartbeat")}
            assert stored_minutes(app, device_id) == sorted(minutes)
            uploads = [body for url, body in telemetry if url.endswith("/stats")]
            assert stored_uploads(app, device_id) == [
                (number, int(fleetmon.utc_datetime(body["sent_at"]).timestamp()), body["upload_time"])
                for number, body in enumerate(uploads, start=1)]
    with open_app(database) as again:  # and the next start has nothing to upgrade
        assert again.config["UPGRADED"] is None


# The trigger note_heard as schema version 1 had it.
# What schema version 1 was, as today's schema changed back: its tables were today's.
VERSION_1_FORMS = {
    # As first released: writes in Python, not through views, and the never-heard
    # devices indexed by key.
    "as first released": [
        "DROP VIEW heard", "DROP VIEW heartbeats", "DROP VIEW upload_reports",  # and their triggers
        "DROP INDEX devices_never_heard",
        "CREATE INDEX devices_never_heard ON devices (device_key) WHERE last_heard_ms IS NULL",
    ],
    # Later: note_heard with UPDATE ... FROM.
    "with note_heard's first form": ["DROP TRIGGER note_heard", """
        CREATE TRIGGER note_heard INSTEAD OF INSERT ON heard BEGIN
            UPDATE devices SET newest_minute = max(coalesce(newest_minute, bounded.minute), bounded.minute),
                               last_heard_ms = NEW.heard_at_ms
            FROM (SELECT min(NEW.minute, NEW.heard_at_ms / 60000 + 1440) AS minute) AS bounded
            WHERE device_key = NEW.device_key;
        END"""],
}


@pytest.mark.parametrize("form", VERSION_1_FORMS)
def test_a_version_1_database_is_upgraded_to_the_schema_a_new_one_gets(tmp_path, form):
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    with open_app(new):
        pass
    with open_app(old) as app:
        send_day(app.test_client(), simulated_day(FIRST_DEVICE))
    with closing(sqlite3.connect(old, isolation_level=None)) as db:
        for statement in VERSION_1_FORMS[form]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
    _, _, rows = everything_in(old)
    with closing(fleetmon.connect(old)) as db:  # the upgrade's one transaction, without the start's after it
        told = fleetmon.upgrade(db, old, (HERE / "schema.sql").read_text(encoding="utf-8"))
    assert re.fullmatch(rf"upgraded database {re.escape(str(old))} from schema version 1 to "
                        rf"{fleetmon.SCHEMA_VERSION}: 0 rows written in \d+\.\d s", told)
    version, _, rows_after = everything_in(old)
    assert (version, rows_after) == ((fleetmon.SCHEMA_VERSION,), rows)
    assert definitions(old) == definitions(new)


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path):
    database = tmp_path / "old.db"
    first_layout_database(database, ODD_DAYS)
    with closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE online_hours (x)")  # in the way of the upgrade, half-way through
    before = everything_in(database)
    with pytest.raises(StartupError) as refused:
        create_app(database=database)
    assert str(refused.value) == (f"cannot upgrade database {database} from schema version 0: "
                                  "table online_hours already exists; it is left as it was")
    assert everything_in(database) == before


def test_a_database_from_a_newer_fleetmon_is_refused_untouched(tmp_path, capsys):
    database = tmp_path / "newer.db"
    with closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE from_the_future (x)")
        db.execute(f"PRAGMA user_version = {fleetmon.SCHEMA_VERSION + 1}")
    before = database.read_bytes()
    refusal = (f"fleetmon: database {database} was written by a newer fleetmon (schema version "
               f"{fleetmon.SCHEMA_VERSION + 1}, this one knows up to {fleetmon.SCHEMA_VERSION}); it is left as it was\n")
    assert start_with(capsys, "--db", database) == (1, refusal)
    assert database.read_bytes() == before


# --- Retention ----------------------------------------------------------------------------


def prune_all(app, keep_days):
    """Prune to the end, as the housekeeping does; how many steps it took."""
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        pruning, steps = fleetmon.Pruning(keep_days), 0
        while pruning.step(db):
            steps += 1
    return steps


def test_pruning_keeps_the_stats_and_refuses_what_it_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(fleetmon, "PRUNE_ROWS_PER_STEP", 10)  # many small steps
    with open_app(tmp_path / "fleetmon.db") as app:
        client = app.test_client()
        day = 24 * 60
        sent = [minute_of_day(minute) for minute in range(0, 4 * day, 7)]
        send(client, *(heartbeat(sent_at) for sent_at in sent), *(upload(n, sent_at) for n, sent_at in enumerate(sent)))
        send(client, *(heartbeat(sent_at, OTHER_DEVICE) for sent_at in sent[:50]))
        stats = {device_id: client.get(stats_url(device_id)).get_json() for device_id in (DEVICE, OTHER_DEVICE)}
        other_before = (stored_minutes(app, OTHER_DEVICE), stored_uploads(app, OTHER_DEVICE))

        assert prune_all(app, keep_days=1) > 10
        kept_from = (utc_minute(sent[-1]) - day) // 60 * 60  # a whole hour
        assert stored_minutes(app) == [m for m in map(utc_minute, sent) if m >= kept_from]
        assert [upload[1] // 60 for upload in stored_uploads(app)] == [m for m in map(utc_minute, sent) if m >= kept_from]
        assert {device_id: client.get(stats_url(device_id)).get_json() for device_id in stats} == stats
        # The other device's history is its own: its newest minute is days older, and all of it is kept.
        assert (stored_minutes(app, OTHER_DEVICE), stored_uploads(app, OTHER_DEVICE)) == other_before

        late = minute_to_rfc3339(kept_from - 1)
        message = (f"sent_at is before {minute_to_rfc3339(kept_from)}, where this device's kept history begins "
                   "(older telemetry is pruned); nothing was stored")
        for path, body in (heartbeat(sent[0]), heartbeat(late), upload(5, late)):
            assert_refused(app, client, path, body, 409, message)
        send(client, heartbeat(minute_to_rfc3339(kept_from)))  # the first minute kept is taken
        assert client.get(f"/debug/stats/{DEVICE}").get_json()["history_kept_from"] == minute_to_rfc3339(kept_from)
        assert prune_all(app, keep_days=1) == 0  # nothing more until its window moves an hour on


def test_the_strip_shows_only_the_kept_history(app, client):
    # Heartbeats at 1969-12-31 23:59 and 1970-01-01 00:10, an upload a day later: the kept
    # history begins at minute 0, and then, after another upload, after every heartbeat.
    send(client, heartbeat("1969-12-31T23:59:00Z"), heartbeat("1970-01-01T00:10:00Z"), upload(1, "1970-01-02T00:30:00Z"))
    prune_all(app, keep_days=1)
    assert strips(fleet_page(client))[0][:3] == ("1 of 10 minutes online", "1970-01-01T00:00:00Z", "1970-01-01T00:10:00Z")
    send(client, upload(1, "1970-01-03T00:30:00Z"))
    prune_all(app, keep_days=1)
    page = fleet_page(client)
    assert strips(page) == [] and page.count("no heartbeats in its kept history") == 1


def test_a_clock_far_ahead_cannot_make_retention_refuse_the_present(app, client):
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    send(client, heartbeat(now.isoformat().replace("+00:00", "Z")), heartbeat("2030-01-01T00:00:00Z"))
    prune_all(app, keep_days=1)
    send(client, heartbeat((now + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")))  # still taken


# --- The document, the docs page, the root and the debug views ----------------------------


def test_openapi_json_is_the_shipped_file_whatever_the_host_header_says(client):
    response = client.get("/openapi.json", headers={"Host": "attacker.example"})
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == json.loads((HERE / "openapi.json").read_text(encoding="utf-8"))


def test_every_route_is_documented_and_every_documented_path_is_routed(app):
    documented = {
        (path, method.upper())
        for path, operations in json.loads((HERE / "openapi.json").read_text(encoding="utf-8"))["paths"].items()
        for method in operations
    }
    routed = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routed == documented


def test_the_docs_are_swagger_ui_served_by_fleetmon_alone(client):
    redirect = client.get("/docs")
    assert (redirect.status_code, redirect.headers["Location"][-6:]) == (308, "/docs/")
    page = client.get("/docs/")
    assert (page.status_code, page.content_type) == (200, "text/html; charset=utf-8")
    html = page.get_data(as_text=True)
    assert 'url: "/openapi.json"' in html
    assets = re.findall(r'(?:src|href)="\./([^"]+)"', html)
    assert set(assets) == {"swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png",
                           "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"}
    for asset in assets:
        with client.get(f"/docs/{asset}") as response:  # a file sent as it is read: closed after
            assert response.status_code == 200
    assert "http://" not in html and "https://" not in html  # nothing from the network


def test_the_root_says_what_this_is(client):
    response = client.get("/")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == {"name": "fleetmon", "version": "1.0.0", "devices": 5, "links": {
        "fleet_page": "/", "devices": "/api/v1/devices", "metrics": "/metrics", "docs": "/docs/",
        "openapi": "/openapi.json", "example_stats": "/api/v1/devices/18-b8-87-e7-1f-06/stats"}}
    assert client.get(response.get_json()["links"]["example_stats"]).status_code == 204


def test_debug_devices_lists_what_each_device_sent_a_page_at_a_time(client):
    send(client, heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:00:30Z"),
         upload(1, device_id=OTHER_DEVICE))
    response = client.get("/debug/devices")
    assert (response.status_code, response.content_type) == (200, "application/json")
    kept = {"history_kept_from": None}
    assert response.get_json() == {"devices": [
        {"device_id": "18-b8-87-e7-1f-06", "has_sent": False, "online_minutes": 0, "upload_count": 0, **kept},
        {"device_id": "26-9a-66-01-33-83", "has_sent": False, "online_minutes": 0, "upload_count": 0, **kept},
        {"device_id": "38-4e-73-e0-33-59", "has_sent": False, "online_minutes": 0, "upload_count": 0, **kept},
        {"device_id": "60-6b-44-84-dc-64", "has_sent": True, "online_minutes": 1, "upload_count": 0, **kept},
        {"device_id": "b4-45-52-a2-f1-3c", "has_sent": True, "online_minutes": 0, "upload_count": 1, **kept},
    ], "next": None}
    pages, url = [], "/debug/devices?limit=2"
    while url:
        answer = client.get(url).get_json()
        pages.append([device["device_id"] for device in answer["devices"]])
        url = answer["next"]
    assert pages == [sorted(PUBLISHED_DAYS)[0:2], sorted(PUBLISHED_DAYS)[2:4], sorted(PUBLISHED_DAYS)[4:5]]
    assert client.get("/debug/devices?limit=5").get_json()["next"] is None  # no next page after the last device


def listed(app):
    client = app.test_client()
    return {
        view: [device["device_id"] for device in client.get(view).get_json()["devices"]]
        for view in ("/debug/devices", "/api/v1/devices")
    } | {"/": listed_ids(client.get("/", headers=HTML).get_data(as_text=True))}


def test_two_fleetmons_on_one_database_each_list_their_own_devices(app, tmp_path):
    everything = sorted(PUBLISHED_DAYS)
    with open_app(app.config["DATABASE"], devices_file(tmp_path, DEVICE, "cam-1")) as fewer:
        assert listed(fewer) == {"/debug/devices": [DEVICE, "cam-1"], "/api/v1/devices": [DEVICE, "cam-1"],
                                 "/": [DEVICE, "cam-1"]}
        assert sorted(listed(app)["/"]) == listed(app)["/api/v1/devices"] == everything
    assert listed(app)["/debug/devices"] == everything  # after the other stopped too


def test_debug_stats_show_the_telemetry_behind_the_stats(client):
    assert client.get(f"/debug/stats/{DEVICE}").get_json() == {
        "device_id": DEVICE, "online_minutes": 0, "first_online_minute": None, "last_online_minute": None,
        "upload_count": 0, "upload_total_ns": 0, "history_kept_from": None, "stored_hours": 0,
        "stored_uploads": 0, "stats": None,
    }
    send_day(client, simulated_day(DEVICE))
    response = client.get(f"/debug/stats/{DEVICE}")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == {
        "device_id": DEVICE, "online_minutes": 479, "first_online_minute": "2024-01-01T10:00:00Z",
        "last_online_minute": "2024-01-01T18:00:00Z", "upload_count": 100, "upload_total_ns": 18_789_337_913_499,
        "history_kept_from": None, "stored_hours": 9, "stored_uploads": 100,
        "stats": {"uptime": 479 / 480 * 100, "avg_upload_time": "3m7.893379134s"},
    }
    assert response.get_json()["stats"] == client.get(stats_url()).get_json()


@pytest.mark.parametrize("path", ["/debug/devices", "/api/v1/devices"])
@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1", "²", "9" * 5000])
def test_a_list_limit_is_1_to_1000(client, path, limit):
    response = client.get(f"{path}?limit={limit}")
    assert (response.status_code, response.get_json()) == (400, {"msg": "limit must be a whole number from 1 to 1000"})


# --- A real server ------------------------------------------------------------------------


def test_the_simulators_day_from_16_clients_over_waitress_gives_its_published_table(app):
    """Every vendor device's day dealt out to 16 clients, so that each device is written
    from several connections at once, through fleetmon's own waitress server; then the
    table the simulator publishes, as it prints it."""
    telemetry = [event for device_id in PUBLISHED_DAYS for event in simulated_day(device_id)]
    with waitress_server(app) as port:

        def send_share(share):
            with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
                return [http_request(connection, "POST", event.path, event.body) for event in share]

        with ThreadPoolExecutor(16) as pool:
            answers = [answer for share in pool.map(send_share, [telemetry[i::16] for i in range(16)])
                       for answer in share]
        assert answers == [(204, b"")] * len(telemetry)

        table = {}
        with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
            for device_id in PUBLISHED_DAYS:
                status, body = http_request(connection, "GET", stats_url(device_id))
                stats = json.loads(body)
                table[device_id] = (status, f"{stats['uptime']:.5f}", stats["avg_upload_time"])
    assert table == {device_id: (200, published.uptime, published.avg_upload_time)
                     for device_id, published in PUBLISHED_DAYS.items()}


def test_every_acknowledged_heartbeat_survives_kill_9(tmp_path):
    database = tmp_path / "fleetmon.db"
    first_minute = utc_minute("2024-01-01T10:00:00Z")
    acknowledged = []
    enough = threading.Event()

    with server_process("--port", "0", "--db", str(database)) as (process, port, printed, _):
        url = f"http://127.0.0.1:{port}"
        assert printed == [
            f"fleetmon: 5 devices from {DEVICES_CSV}, database {database}\n",
            "fleetmon: a device is down after 5m unheard\n",
            f"fleetmon: listening on {url}/api/v1 (fleet page {url}/, docs {url}/docs/)\n",
        ]

        def stream():
            try:
                with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
                    for minute in range(first_minute, first_minute + 100_000):
                        if http_request(connection, "POST", *heartbeat(minute_to_rfc3339(minute))) == (204, b""):
                            acknowledged.append(minute)
                        if len(acknowledged) >= 300:
                            enough.set()
            except (OSError, HTTPException):
                pass  # the server was killed mid-request
            finally:
                enough.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert enough.wait(timeout=60)
        process.kill()
        process.wait()
        streamer.join(timeout=60)
        assert not streamer.is_alive()

    assert len(acknowledged) >= 300
    with open_app(database) as restarted:
        minutes = set(stored_minutes(restarted))
        assert minutes.issuperset(acknowledged)
        debug = restarted.test_client().get(f"/debug/stats/{DEVICE}").get_json()
        assert debug["online_minutes"] == len(minutes)  # the aggregates committed with the rows


# --- A real server: connections, limits and malformed HTTP --------------------------------


def heartbeat_request(minute=0, extra_headers=b""):
    body = json.dumps({"sent_at": minute_of_day(minute)}).encode()
    return (f"POST {heartbeat_url()} HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: {len(body)}\r\n".encode()
            + extra_headers + b"\r\n" + body)


def test_a_connection_stays_open_after_a_204_until_the_client_asks_to_close(app):
    pipelined = b"".join(heartbeat_request(minute) for minute in range(49))
    with waitress_server(app) as port:  # raw_exchange reads on until the server closes
        answers = raw_exchange(port, pipelined + heartbeat_request(49, extra_headers=b"Connection: close\r\n"))
    responses = answers.split(b"HTTP/1.1 204")[1:]
    assert [b"Connection: close" in response for response in responses] == [False] * 49 + [True]
    assert len(stored_minutes(app)) == 50


def test_stock_waitress_still_closes_the_connection_after_a_204():
    """Stock waitress, without fleetmon's channel, closes after a 204, which
    fleetmon.KeepAliveTask undoes. Of two pipelined requests, the second asking to close,
    a waitress that keeps the connection answers both, one that closes after a 204 only
    the first, so the test needs no timeout to tell which."""

    def no_content(environ, start_response):
        start_response("204 No Content", [])
        return []

    server = waitress.create_server(no_content, host="127.0.0.1", port=0)
    with running(server):
        answer = raw_exchange(server.effective_port,
                              heartbeat_request(0) + heartbeat_request(1, extra_headers=b"Connection: close\r\n"))
    assert answer.count(b"HTTP/1.1 204") == 1, (
        "waitress now keeps the connection open after a 204 (upstream pull request Pylons/waitress#502): "
        "delete fleetmon.KeepAliveTask, and this test")
    assert b"Connection: close" in answer


def test_hundreds_of_idle_and_slow_connections_do_not_lock_clients_out(app):
    with waitress_server(app) as port, ExitStack() as sockets:
        for number in range(400):
            sock = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            if number % 2:
                sock.sendall(b"POST / HTTP/1.1\r\nX-Slow: ")  # a header that never ends
        with closing(HTTPConnection("127.0.0.1", port, timeout=5)) as connection:
            assert http_request(connection, "GET", stats_url()) == (204, b"")


def test_idle_connections_are_dropped_within_seconds(app, monkeypatch):
    # fleetmon's settings reach the server: shortened here, an idle connection is closed.
    monkeypatch.setitem(fleetmon.WAITRESS_SETTINGS, "channel_timeout", 1)
    monkeypatch.setitem(fleetmon.WAITRESS_SETTINGS, "cleanup_interval", 1)
    with waitress_server(app) as port:
        assert raw_exchange(port, b"") == b""


@pytest.mark.parametrize(
    ("request_bytes", "status", "msg"),
    [
        (b"GARBAGE\r\n\r\n", b"400 Bad Request", "Bad Request: Start line is invalid"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", b"400 Bad Request",
         "Bad Request: Content-Length is invalid"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400 Bad Request",
         "Bad Request: Invalid chunk size"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501 Not Implemented",
         "Not Implemented: Transfer-Encoding requested is not supported."),
        # Exactly the 256 KiB limit and no end, so the server reads it all before answering.
        (b"GET / HTTP/1.1\r\nX-Big: ".ljust(256 * 1024, b"x"), b"431 Request Header Fields Too Large",
         "Request Header Fields Too Large: exceeds max_header of 262144"),
        # Refused from its Content-Length, before one byte of the body is sent.
        (f"POST {heartbeat_url()} HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 20000000\r\n\r\n".encode(),
         b"413 Request Entity Too Large", "Request Entity Too Large: exceeds max_body of 65537"),
    ],
)
def test_http_the_server_layer_refuses_is_answered_in_json(app, request_bytes, status, msg):
    with waitress_server(app) as port:
        head, body = raw_exchange(port, request_bytes).split(b"\r\n\r\n", 1)
    assert status in head.split(b"\r\n")[0]
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"msg": msg}


# --- A real server: connection slots ------------------------------------------------------
#
# The server's clocks are driven by hand here: it checks its connections only when a test
# calls maintenance() (cleanup_interval is an hour), always in the server's own loop thread
# (on_loop), and the tests wait for what the server has read, never for time to pass.

BIG_RESPONSE_BYTES = 12 * 1024 * 1024  # more than socket buffers hold, less than waitress's high watermark
HELLO = b"GET /hello HTTP/1.1\r\nHost: fleetmon\r\n\r\n"
HELLO_AND_CLOSE = b"GET /hello HTTP/1.1\r\nHost: fleetmon\r\nConnection: close\r\n\r\n"


@pytest.fixture
def small_app():
    """A Flask app with answers of every speed and size, for the connection-slot tests."""
    app = Flask(__name__)
    release = threading.Event()
    app.add_url_rule("/hello", "hello", lambda: "hello")
    app.add_url_rule("/echo", "echo", lambda: request.get_data(), methods=["POST"])
    app.add_url_rule("/big", "big", lambda: b"x" * BIG_RESPONSE_BYTES)

    @app.get("/slow")
    def slow():
        release.wait(timeout=30)
        return "slow"

    app.config["RELEASE"] = release
    yield app
    release.set()  # so that the worker thread can stop


@contextmanager
def serving(app, **settings):
    """fleetmon's server for app, its connections checked only when a test says; yields
    (server, connect(rcvbuf=None), a new client socket, closed after)."""
    with running(fleetmon.create_server(app, "127.0.0.1", 0, cleanup_interval=3600, **settings)) as server, \
            ExitStack() as sockets:

        def connect(rcvbuf=None):
            client = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            if rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client.settimeout(10)
            client.connect(("127.0.0.1", int(server.effective_port)))
            return client

        yield server, connect


def on_loop(server, function):
    """function() run in the server's loop thread, between two select() calls, where
    the server reads and changes its channels."""
    results = queue.Queue()

    def call():
        try:
            results.put((True, function()))
        except Exception as error:  # noqa: BLE001 - raised again in the test's thread
            results.put((False, error))

    server.trigger.pull_trigger(call)
    ok, result = results.get(timeout=10)
    if not ok:
        raise result
    return result


def wait_until(server, condition, what):
    """Wait for the server to reach a state (in its loop thread), failing after 10 s."""
    deadline = time.monotonic() + 10
    while not on_loop(server, condition):
        assert time.monotonic() < deadline, f"the server did not reach: {what}"
        time.sleep(0.01)


def channel_of(server, client):
    """The server's channel for a client socket, or None if the server has none."""
    port = client.getsockname()[1]
    return next((c for c in server.active_channels.values() if c.addr[1] == port), None)


def fill_the_slots(server, connect):
    """A client for every free connection slot, each accepted."""
    clients = [connect() for _ in range(server.adj.connection_limit - on_loop(server, lambda: len(server._map)))]
    wait_until(server, lambda: len(server._map) == server.adj.connection_limit
               and all(channel_of(server, c) for c in clients), "every client accepted")
    return clients


def hello(client):
    """GET /hello on a connection kept open, its answer read to its end."""
    client.sendall(HELLO)
    answer = b""
    while not answer.endswith(b"hello") and (chunk := client.recv(65536)):
        answer += chunk
    return answer


@pytest.mark.parametrize("sent", [
    b"GET /hello HTTP/1.1\r\nHost: fle",  # a head trickled
    b"POST /echo HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 10\r\n\r\nabc",  # a body trickled
], ids=["head", "body"])
def test_a_request_not_in_within_the_limit_is_answered_408_and_closed(small_app, sent):
    with serving(small_app) as (server, connect):
        client = connect()
        client.sendall(sent)
        wait_until(server, lambda: channel_of(server, client) and channel_of(server, client).request_began,
                   "the request began")
        began = on_loop(server, lambda: channel_of(server, client).request_began)

        on_loop(server, lambda: server.maintenance(began + fleetmon.REQUEST_SECONDS))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "closing while in time"

        on_loop(server, lambda: server.maintenance(began + fleetmon.REQUEST_SECONDS + 1))
        head, _, body = read_to_end(client).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert json.loads(body) == {
            "msg": f"Request Timeout: the request did not arrive within {fleetmon.REQUEST_SECONDS} s"}
        wait_until(server, lambda: channel_of(server, client) is None, "the channel closed")


def test_an_idle_keep_alive_connection_is_left_to_channel_timeout(small_app):
    with serving(small_app) as (server, connect):
        client = connect()
        assert hello(client).endswith(b"hello")
        client.sendall(b"\r\n")  # as some clients do after a request; it begins none (RFC 9112, 2.2)
        wait_until(server, lambda: channel_of(server, client).request is not None, "the blank line read")
        assert on_loop(server, lambda: channel_of(server, client).between_requests())
        idle_since = on_loop(server, lambda: channel_of(server, client).last_activity)

        on_loop(server, lambda: server.maintenance(idle_since + fleetmon.REQUEST_SECONDS + 1))
        on_loop(server, lambda: server.maintenance(idle_since + server.adj.channel_timeout - 1))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "closed before channel_timeout"

        on_loop(server, lambda: server.maintenance(idle_since + server.adj.channel_timeout + 1))
        assert read_to_end(client) == b"", "waitress closes an idle connection without a word"


def test_a_pipelined_request_gets_its_time_from_when_the_server_reads_it(small_app):
    with serving(small_app, channel_timeout=3600) as (server, connect):
        client = connect()
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: fleetmon\r\n\r\nGET /hello HTTP/1.1\r\nHo")
        wait_until(server, lambda: channel_of(server, client) and channel_of(server, client).requests,
                   "the first request queued")
        began = on_loop(server, lambda: channel_of(server, client).request_began)
        assert began is not None

        # Long after it began, but the server has been busy with the one before.
        on_loop(server, lambda: server.maintenance(began + fleetmon.REQUEST_SECONDS + 5))
        small_app.config["RELEASE"].set()
        wait_until(server, lambda: not channel_of(server, client).requests, "the first request answered")
        on_loop(server, lambda: server.maintenance(began + fleetmon.REQUEST_SECONDS + 5 + fleetmon.REQUEST_SECONDS))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "timed from when it began"
        client.sendall(b"st: fleetmon\r\nConnection: close\r\n\r\n")
        answers = read_to_end(client)
        assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.endswith(b"hello")


def test_at_the_limit_the_longest_idle_connection_makes_room_unless_a_request_has_come_on_it(small_app):
    with serving(small_app, connection_limit=5) as (server, connect):
        first, used, last = clients = fill_the_slots(server, connect)
        assert hello(used).endswith(b"hello")
        wait_until(server, lambda: channel_of(server, used).between_requests(), "the request answered")

        def hold_newcomers():
            server.accepting = False  # until this test makes the server accept
            for client, idle_since in zip(clients, [0, 2, 1]):  # not in the order they were accepted, or used
                channel_of(server, client).last_activity = idle_since
        on_loop(server, hold_newcomers)
        newcomer = connect()  # into the listen queue
        newcomer.sendall(HELLO_AND_CLOSE)

        def request_comes_then_accept():
            # In the loop thread, so that the server cannot read the request first.
            first.sendall(HELLO_AND_CLOSE)
            assert select.select([channel_of(server, first).socket], [], [], 10)[0], "the request did not come"
            server.accepting = True
            server.handle_accept()
        on_loop(server, request_comes_then_accept)

        assert read_to_end(last) == b"", "the longest idle without a request come"
        assert read_to_end(first).endswith(b"hello")
        assert read_to_end(newcomer).endswith(b"hello")
        assert on_loop(server, lambda: channel_of(server, used)) is not None, "another one closed"


def test_no_connection_in_the_middle_of_a_request_is_shed(small_app):
    # In memory: a temporary file would be left open, as wasyncore.close_all() closes a
    # channel's socket but not its buffers.
    with serving(small_app, connection_limit=6, outbuf_overflow=2 * BIG_RESPONSE_BYTES) as (server, connect):
        assert on_loop(server, lambda: server.adj.connection_limit - len(server._map)) == 4

        writing = connect(rcvbuf=4096)  # reads none of its response
        writing.sendall(b"GET /big HTTP/1.1\r\nHost: fleetmon\r\n\r\n")
        wait_until(server, lambda: channel_of(server, writing) and not channel_of(server, writing).requests
                   and channel_of(server, writing).total_outbufs_len, "the response being written")
        running_task = connect()
        running_task.sendall(b"GET /slow HTTP/1.1\r\nHost: fleetmon\r\n\r\n")
        reading_head = connect()
        reading_head.sendall(b"GET /hello HTTP/1.1\r\nHo")
        reading_body = connect()
        reading_body.sendall(b"POST /echo HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 10\r\n\r\nabc")
        busy = [writing, running_task, reading_head, reading_body]
        wait_until(server, lambda: all(channel_of(server, c) and channel_of(server, c).request_began for c in busy[2:])
                   and channel_of(server, running_task).requests, "every connection busy")

        def make_them_look_idle_longest():
            for client in busy:
                channel_of(server, client).last_activity = 0
        on_loop(server, make_them_look_idle_longest)

        newcomer = connect()  # into the listen queue
        newcomer.sendall(HELLO_AND_CLOSE)
        assert on_loop(server, server.readable) is False, "accepting with no connection to shed"
        assert on_loop(server, lambda: all(channel_of(server, c) for c in busy)), "a busy one shed"
        assert on_loop(server, lambda: channel_of(server, newcomer)) is None, "the newcomer accepted"

        # The task ends, its connection goes idle, and makes room.
        small_app.config["RELEASE"].set()
        assert read_to_end(newcomer).endswith(b"hello")
        assert read_to_end(running_task).endswith(b"slow")  # its answer whole, then closed
        assert on_loop(server, lambda: [channel_of(server, c) is not None for c in busy]) == [True, False, True, True]


# --- Start-up mistakes --------------------------------------------------------------------


def start_with(capsys, *args):
    """fleetmon's exit status and what it printed for args, when it does not start."""
    status = fleetmon.main(list(map(str, args)))
    printed = capsys.readouterr()
    assert printed.out == ""
    return status, printed.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "{tmp}/missing/fleetmon.db"],
         "cannot use database {tmp}/missing/fleetmon.db: there is no folder {tmp}/missing"),
        (["--db", "{tmp}"], "cannot use database {tmp}: unable to open database file"),
        (["--db", "{tmp}/notes.txt"], "cannot use database {tmp}/notes.txt: file is not a database"),
        *((["--port", str(port)], f"port {port} is outside 0-65535") for port in (-1, 65536, 99999)),
        (["--keep-days", "0"], "--keep-days must be 1 or more, not 0"),
        (["--alert-url", "hooks.example/x"], "--alert-url must be an http:// or https:// URL, not 'hooks.example/x'"),
    ],
)
def test_an_unusable_database_port_or_option_stops_the_start_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "notes.txt").write_bytes(b"not a database, just text " * 100)
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert start_with(capsys, *args) == (1, f"fleetmon: {message.format(tmp=tmp_path)}\n")


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, printed = start_with(capsys, "--port", port, "--db", tmp_path / "fleetmon.db")
    assert (status, printed) == (
        1, f"fleetmon: cannot listen on 127.0.0.1:{port}: the port is in use (another fleetmon? --port chooses another)\n"
    )


def test_a_database_failing_as_the_watch_starts_stops_the_start_with_one_line(tmp_path, capsys, monkeypatch):
    opened, real_connect = [], fleetmon.connect

    def connect(database):
        opened.append(real_connect(database))
        return opened[-1]


    def watch_failing(db, *args):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(fleetmon, "connect", connect)
    monkeypatch.setattr(fleetmon, "Watch", watch_failing)
    assert start_with(capsys, "--port", 0, "--db", tmp_path / "fleetmon.db") == (
        1, f"fleetmon: cannot use database {tmp_path / 'fleetmon.db'}: disk I/O error\n")
    assert len(opened) >= 3  # the start's, a request's, the watch's
    for db in opened:  # every connection it opened, closed
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")


# --- The server window --------------------------------------------------------------------


def test_activity_is_one_line_per_interval_and_nothing_while_idle(app, client):
    activity = fleetmon.Activity(app.extensions["fleetmon.answers"], monotonic_now=100)
    assert activity.take_line(110) is None
    send(client, *(heartbeat(minute_of_day(minute)) for minute in range(3)), upload(5))
    client.get(stats_url())
    client.get("/")  # not telemetry: not counted
    client.post(heartbeat_url(), data=b"{")
    client.post(heartbeat_url(), data=b"[]")
    client.get(stats_url("unknown"))
    assert activity.take_line(120) == (
        "fleetmon: last 10 s: 3 heartbeats, 1 uploads, 1 stats reads, 3 rejected (400 x2, 404 x1)"
    )
    assert activity.take_line(123.5) is None


@pytest.mark.parametrize(("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("localhost", "localhost")])
def test_an_ipv6_address_is_bracketed_in_a_url(host, shown):
    assert fleetmon.url_host(host) == shown


def test_the_server_window_from_the_start_to_ctrl_c(tmp_path, capsys, monkeypatch):
    real_create_server = fleetmon.create_server

    def server_stopped_by_ctrl_c(app, host, port):
        server = real_create_server(app, host, port)

        def run():  # waitress's run() returns when Ctrl+C stops it; before that, one request
            app.test_client().post(heartbeat_url(), json={"sent_at": SENT_AT})

        server.run = run
        return server

    monkeypatch.setattr(fleetmon, "create_server", server_stopped_by_ctrl_c)
    devices, database = devices_file(tmp_path, DEVICE), tmp_path / "fleetmon.db"
    with open_app(database, devices) as app:
        fleetmon.serve(app, "127.0.0.1", 0, down_after_seconds=60, alert_url=None)
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"fleetmon: 1 device from {devices}, database {database}",
                       "fleetmon: a device is down after 1m unheard"]
    assert re.fullmatch(r"fleetmon: listening on http://127\.0\.0\.1:\d+/api/v1 \(.*\)", out[2])
    assert re.fullmatch(r"fleetmon: last \d+ s: 1 heartbeats, 0 uploads, 0 stats reads, 0 rejected", out[3])
    assert out[4:] == ["fleetmon: stopped"]


# --- simulator.py -------------------------------------------------------------------------


def simulate(*args):
    """simulator.main for args, each as text: its exit status."""
    return simulator.main([str(arg) for arg in args])


def test_the_simulator_sends_the_day_of_any_devices_file_and_prints_the_published_table(tmp_path, capsys):
    devices = devices_file(tmp_path, *PUBLISHED_DAYS, "cam-1", "cam-2")
    with open_app(tmp_path / "fleet.db", devices) as app, waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[1:-2]] == [
        *([device_id, day.uptime, day.avg_upload_time, "PASS"] for device_id, day in sorted(PUBLISHED_DAYS.items())),
        ["cam-1", "-", "-"],  # the first device not the vendor's sends nothing
    ]
    assert lines[-2].split()[0] == "cam-2" and float(lines[-2].split()[1]) > 0
    sent = sum(len(simulated_day(device_id)) for device_id in [*PUBLISHED_DAYS, "cam-2"])
    assert lines[-1] == f"simulator: {sent:,} requests sent, 0 failed; 5 of 5 published results match"


def test_simulated_days_are_repeatable_per_seed_and_make_a_varied_fleet():
    def uptime(day):
        minutes = {utc_minute(event.body["sent_at"]) for event in day if event.path.endswith("/heartbeat")}
        return uptime_percent(len(minutes), min(minutes), max(minutes))

    fleet = [simulated_day(f"cam-{number:03d}", seed=7) for number in range(100)]
    assert fleet[:10] == [simulated_day(f"cam-{number:03d}", seed=7) for number in range(10)]
    assert fleet[:10] != [simulated_day(f"cam-{number:03d}", seed=8) for number in range(10)]
    uptimes = sorted(uptime(day) for day in fleet)
    assert uptimes[0] < 90  # some flaky
    assert uptimes[50] > 99  # most steady
    assert all(len([event for event in day if event.path.endswith("/stats")]) == 100 for day in fleet)


def test_the_simulator_runs_as_a_script_on_the_standard_library_alone():
    # -S: no site-packages, so that importing fleetmon (and so Flask) or any other package fails.
    result = subprocess.run([sys.executable, "-S", str(HERE / "simulator.py"), "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: simulator.py [-h] [--url URL] [--devices CSV] [--seed SEED]")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        *((["--pace", pace], f"argument --pace: must be a number of seconds, 0 or more, not '{pace}'")
          for pace in ("-5", "nan", "inf")),
        (["--live", "--every", "0"], "argument --every: must be a number of seconds, 0.01 or more, not '0'"),
        *((["--url", url], f"argument --url: must be an http:// URL with a valid port, not '{url}'")
          for url in ("http://127.0.0.1:99999", "ftp://127.0.0.1", "127.0.0.1:6733")),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--devices", "no-such.csv"], "cannot read devices file no-such.csv: No such file or directory"),
    ],
)
def test_the_simulator_refuses_what_it_cannot_use_in_one_line(capsys, args, message):
    assert simulate(*args) == 2
    assert capsys.readouterr() == ("", f"simulator: {message}\n")


def test_the_simulator_without_fleetmon_is_one_line_and_exit_2(capsys):
    url = f"http://127.0.0.1:{unused_port()}"
    assert simulate("--url", url) == 2
    assert capsys.readouterr() == ("", f"simulator: nothing answers at {url} (connection refused); is fleetmon running?\n")


@pytest.mark.parametrize(("known", "unknown"), [(["cam-1", "cam-2"], 5), (sorted(PUBLISHED_DAYS)[:3], 2)])
def test_a_fleetmon_started_with_another_devices_file_is_told_and_sent_nothing(tmp_path, capsys, known, unknown):
    with open_app(tmp_path / "fleetmon.db", devices_file(tmp_path, *known)) as app, waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}") == 2
        assert stored(app, ("online_hours", "uploads")) == {"online_hours": [], "uploads": []}
    told = (f"simulator: fleetmon at http://127.0.0.1:{port} does not know {unknown} of the 5 devices in "
            f"{DEVICES_CSV} (started with another devices file?)\n")
    assert capsys.readouterr() == ("", told)


@pytest.mark.parametrize("again", [False, True])
def test_a_fleetmon_that_holds_telemetry_already_is_told_before_anything_is_sent(app, client, tmp_path, capsys, again):
    """Sent again, a device's uploads count twice: the simulator refuses, unless --again,
    and then checks no published result of a device that had telemetry before."""
    send(client, heartbeat(minute_of_day(4)))
    devices = devices_file(tmp_path, DEVICE, OTHER_DEVICE)
    with waitress_server(app) as port:
        before = stored(app)
        status = simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices, *(["--again"] if again else []))
        after = stored(app)
    printed = capsys.readouterr()
    held = f"simulator: fleetmon at http://127.0.0.1:{port} already holds telemetry for 1 of the 2 devices in {devices}"
    if not again:
        assert (status, printed.out, after) == (2, "", before)
        assert printed.err == (f"{held}: sent again, their uploads would count twice; "
                               "start fleetmon with a fresh --db, or give --again to send anyway\n")
    else:
        assert status == 0
        assert printed.err == f"{held}; sending again (--again), so their published results cannot be checked\n"
        lines = printed.out.splitlines()
        sent = len(simulated_day(DEVICE)) + len(simulated_day(OTHER_DEVICE))
        assert lines[-1] == (f"simulator: {sent:,} requests sent, 0 failed; 1 of 1 published results match; "
                             "1 not checked: fleetmon held their telemetry before")
        assert [line.split()[-2:] for line in lines if line.startswith(DEVICE)] == [["not", "checked"]]


# A server for what fleetmon never answers, run by FakeServer.
STOP = object()  # an answer: stop listening, then drop every connection, as a server stopped


def http_answer(status, body=b""):
    """An HTTP/1.1 answer with a JSON body, or a 204."""
    if status == 204:
        return b"HTTP/1.1 204 No Content\r\n\r\n"
    head = f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def fleetmon_answer(method, path):
    """What fleetmon answers a simulator on a fresh database."""
    return http_answer(200, b'{"name": "fleetmon"}') if path == "/" else http_answer(204)


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
    A thread for each connection; leaving stops it, joining all."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping, self.stopped, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.accept, name="fake server")]

    def __enter__(self):
        self.threads[0].start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a connection was left open"

    def accept(self):
        with self.listener:
            while not self.stopping.is_set():
                connection, _ = self.listener.accept()
                self.threads.append(threading.Thread(target=self.serve, args=(connection,), name="fake connection"))
                self.threads[-1].start()
        self.stopped.set()

    def stop(self):
        """Stop listening: wake the accepting thread with a last connection, and wait for it."""
        with self.lock:
            if not self.stopping.is_set():
                self.stopping.set()
                socket.create_connection(self.listener.getsockname()).close()
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


FIRST_STATS = f"/api/v1/devices/{min(PUBLISHED_DAYS)}/stats"  # the first the simulator reads
NOT_STATS = f"answered GET {FIRST_STATS} with a body that is not a device's stats"


@pytest.mark.parametrize(
    ("garbled", "answer", "problem"),
    [
        ("/", lambda: b"SSH-2.0-OpenSSH_9.6\r\n", "answered GET / with something that is not HTTP"),
        ("/", lambda: itertools.chain([b"HTTP/1.1 200 OK\r\n\r\n"], itertools.repeat(b"{" * 4096)),
         "answered GET / with a body of more than 64 KiB"),
        ("/", lambda: b"", "closed the connection twice without answering GET /"),
        ("/", lambda: http_answer(200, b'{"name": "something else"}'), "answers, but not as fleetmon (HTTP 200)"),
        (FIRST_STATS, lambda: http_answer(500, b"{}"), f"answered GET {FIRST_STATS} with HTTP 500"),
        (FIRST_STATS, lambda: http_answer(200, b"<p>stats</p>"), NOT_STATS),
        (FIRST_STATS, lambda: http_answer(200, b"[" * 60_000), NOT_STATS),
        (FIRST_STATS, lambda: http_answer(200, b'{"uptime": "high", "avg_upload_time": "3s"}'), NOT_STATS),
    ],
)
def test_a_server_answering_garbage_is_told_in_one_line(capsys, garbled, answer, problem):
    with FakeServer(lambda method, path: answer() if path == garbled else fleetmon_answer(method, path)) as server:
        assert simulate("--url", server.url) == 2
    assert capsys.readouterr() == ("", f"simulator: {server.url} {problem}\n")


def test_a_server_that_never_answers_is_given_up_on_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(simulator, "ANSWER_TIMEOUT_SECONDS", 0.2)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # connections are made, and never read
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert simulate("--url", url) == 2
    assert capsys.readouterr() == ("", f"simulator: {url} did not answer GET / within 0.2 s\n")


def test_when_fleetmon_stops_every_client_stops_at_the_refused_connection(capsys):
    """fleetmon stopping stops listening and drops its connections: the next request is
    refused, and the simulator stops there, rather than count the rest of its day failed."""
    posts = itertools.count(1)

    def answer(method, path):
        return STOP if method == "POST" and next(posts) > 100 else fleetmon_answer(method, path)

    with FakeServer(answer) as server:
        assert simulate("--url", server.url) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert re.fullmatch(rf"simulator: fleetmon at {server.url} stopped answering \(connection refused\) "
                        r"after 10[0-5] of 2,910 requests\n", printed.err)
    # The hundred answered, and at most one more from each of the five clients.
    assert len([method for method, _ in server.requests if method == "POST"]) <= 100 + 5


@pytest.mark.parametrize(
    ("terminal", "printed"),
    [
        (True, ("\rsimulator: 10 of 100 requests sent, 0 failed, 20 requests/s"
                "\rsimulator: 60 of 100 requests sent, 1 failed, 6 requests/s"
                "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s"
                "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s\n")),
        (False, "simulator: 60 of 100 requests sent, 1 failed, 6 requests/s\n"),
    ],
)
def test_progress_is_rewritten_in_place_on_a_terminal_and_a_line_now_and_then_elsewhere(capsys, terminal, printed):
    simulation = simulator.Simulation("http://127.0.0.1:6733", ["cam-1"], seed=0, pace=0)
    simulation.terminal, simulation.started, simulation.shown, simulation.total = terminal, 0.0, 0.0, 100
    for now, sent, failed in [(0.5, 10, 0), (10, 60, 1), (12.5, 100, 1)]:
        simulation.sent, simulation.failed = sent, failed
        simulation.show_progress(now)
    simulation.show_progress(12.5, final=True)
    assert capsys.readouterr() == ("", printed)


def test_live_sends_a_heartbeat_every_interval_but_none_while_a_device_is_dropped_out():
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    run = simulator.LiveRun(["cam-1", "cam-2"], every=10, seed=0, start=start,
                            dropouts=[simulator.Dropout("cam-2", 20, 95)])
    lines, sent = [], []
    for second in range(0, 125, 5):
        assert run.next_step() == start + timedelta(seconds=second)
        printed, telemetry = run.step(start + timedelta(seconds=second))
        lines += [(second, line) for line in printed]
        sent += [(event.path.split("/")[4:], event.body["sent_at"]) for event in telemetry]
    assert lines == [(20, "simulator: cam-2 drops out for 75 s"), (95, "simulator: cam-2 is back after 75 s")]

    def seconds(device_id, endpoint):
        return [round((datetime.fromisoformat(sent_at) - start).total_seconds())
                for path, sent_at in sent if path == [device_id, endpoint]]

    assert seconds("cam-1", "heartbeat") == list(range(0, 125, 10))
    assert seconds("cam-2", "heartbeat") == [5, 15, 95, 105, 115]
    assert seconds("cam-1", "stats") == [0, 60, 120]  # an upload with every sixth heartbeat
    assert seconds("cam-2", "stats") == [5]
    assert sent[0] == (["cam-1", "heartbeat"], "2025-03-01T12:00:00.000000Z")


def test_live_dropouts_come_one_at_a_time_the_first_soon_after_the_start():
    """So that a fleetmon with a short --down-after shows a device go down and come back
    within two minutes of the start, and another every few minutes."""
    dropouts = list(itertools.islice(simulator.live_dropouts(sorted(PUBLISHED_DAYS), seed=0), 100))
    assert dropouts[0].start == 20
    assert all(60 <= dropout.end - dropout.start <= 90 for dropout in dropouts)
    assert all(120 <= later.start - earlier.end <= 300 for earlier, later in itertools.pairwise(dropouts))
    assert {dropout.device_id for dropout in dropouts} == set(PUBLISHED_DAYS)


def test_live_sends_telemetry_stamped_now_until_ctrl_c(app, capsys, monkeypatch):
    naps = []

    def nap_until_the_25th_then_ctrl_c(seconds):
        naps.append(seconds)
        if len(naps) == 25:
            raise KeyboardInterrupt
        time.sleep(seconds)

    monkeypatch.setattr(simulator, "sleep", nap_until_the_25th_then_ctrl_c)
    first_minute = int(time.time() // 60)
    with waitress_server(app) as port:
        status = simulate("--url", f"http://127.0.0.1:{port}", "--live", "--every", "0.05")
    minutes_now = range(first_minute, int(time.time() // 60) + 1)
    printed = capsys.readouterr()
    assert (status, printed.err) == (0, "")
    first, last = printed.out.splitlines()
    assert first == (f"simulator: live to http://127.0.0.1:{port}, a heartbeat every 0.05 s from each of 5 devices; "
                     "Ctrl+C stops")
    assert re.fullmatch(r"simulator: stopped; \d+ requests sent, 0 failed", last)
    minutes = {device_id: stored_minutes(app, device_id) for device_id in PUBLISHED_DAYS}
    assert all(minutes.values())  # every device sent
    assert set().union(*minutes.values()) <= set(minutes_now)  # stamped with the time
    assert all(stored_uploads(app, device_id) for device_id in PUBLISHED_DAYS)


# --- Who is down: status, outages and alerts ----------------------------------------------


class Watched:
    """The app's watch on who is down, on a monotonic clock (`now`) that the test moves
    with check_after(); `lines` are what it announced."""

    def __init__(self, db, down_after, now, listed):
        self.db, self.now, self.lines = db, now, []
        self.watch = fleetmon.Watch(db, down_after, now, listed, announce=self.lines.append)

    def heard(self, device_id, heard_at_ms):
        self.watch.heard(device_id, heard_at_ms, self.now)


@contextmanager
def watching(app, down_after=60, now=1_000.0):
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        watched = Watched(db, down_after, now, app.config["DEVICE_KEYS"])
        app.extensions["fleetmon.heard"].append(watched.heard)
        try:
            yield watched
        finally:
            app.extensions["fleetmon.heard"].remove(watched.heard)


def check_after(watched, seconds):
    """Move the watch's clock on and check: how many devices it declared down."""
    watched.now += seconds
    return watched.watch.check(watched.db, watched.now, fleetmon.now_ms())


class WallClock:
    """fleetmon.now_ms() as a test sets it: 2024-01-01T10:04:00Z to start with."""

    def __init__(self, monkeypatch, ms=1_704_103_440_000):
        self.ms = ms
        monkeypatch.setattr(fleetmon, "now_ms", lambda: self.ms)


def device_json(client, device_id=DEVICE):
    response = client.get(f"/api/v1/devices/{device_id}")
    assert response.status_code == 200
    return response.get_json()


def test_a_device_not_heard_for_the_down_after_time_is_down_and_up_again_when_heard(app, client):
    with watching(app, down_after=60) as watched:
        assert device_json(client)["status"] == "never"
        send(client, heartbeat(SENT_AT))
        heard = device_json(client)
        assert (heard["status"], heard["down_since"], heard["outages"]) == ("up", None, [])
        assert check_after(watched, 59.9) == 0
        assert check_after(watched, 0.1) == 1
        down = device_json(client)
        assert (down["status"], down["down_since"]) == ("down", heard["last_heard"])
        assert down["outages"] == [{"started": heard["last_heard"], "ended": None, "seconds": None}]
        assert re.fullmatch(rf"fleetmon: {DEVICE} is down \(last heard \d\d:\d\d:\d\d UTC, \d+s ago\)", watched.lines[0])
        assert check_after(watched, 600) == 0  # said once

        send(client, upload(5))  # an upload is heard too
        check_after(watched, 0)  # which tells the change
        up = device_json(client)
        assert (up["status"], up["down_since"]) == ("up", None)
        assert up["outages"][0]["started"] == heard["last_heard"] and up["outages"][0]["ended"] == up["last_heard"]
        assert re.fullmatch(rf"fleetmon: {DEVICE} is up again after \d+s", watched.lines[1])
    assert query(app, "SELECT status FROM alerts ORDER BY id") == [("down",), ("up",)]


def test_after_a_restart_no_device_is_down_before_the_down_after_time_and_unlisted_ones_never(app, client):
    with watching(app, down_after=60):
        send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE))  # heard, then fleetmon stops a long while
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:  # restarted with a devices file without DEVICE
        watch = fleetmon.Watch(db, 60, 50_000.0, frozenset({OTHER_DEVICE}), announce=[].append)
        assert watch.check(db, 50_059.0, fleetmon.now_ms()) == 0
        assert device_json(client, OTHER_DEVICE)["status"] == "up"
        assert watch.check(db, 50_060.0, fleetmon.now_ms()) == 1
    assert device_json(client)["status"] == "up" and device_json(client, OTHER_DEVICE)["status"] == "down"


def test_a_device_heard_again_before_it_is_declared_down_stays_up(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT))
        first_heard = wall.ms
        wall.ms += 1_000
        send(client, heartbeat(SENT_AT))  # heard again just after the watch took its deadline
        assert fleetmon.mark_down(watched.db, DEVICE, first_heard, wall.ms + 60_000) is False
        assert device_json(client)["status"] == "up" and watched.lines == []


@pytest.mark.parametrize(("ms", "text"), [(0, "0s"), (999, "0s"), (45_000, "45s"), (300_000, "5m"),
                                          (432_000, "7m12s"), (7_500_000, "2h5m"), (90_000_000, "1d1h"),
                                          (-5, "0s")])
def test_short_duration(ms, text):
    assert fleetmon.short_duration(ms) == text


@pytest.mark.parametrize(("ns", "text"), [(0, "0 ns"), (999, "999 ns"), (1_500, "2 µs"), (850_000_000, "850 ms"),
                                          (999_999_999, "1.0 s"), (59_999_999_999, "1 min 0 s"),
                                          (45_240_000_000, "45.2 s"), (201_858_747_766, "3 min 22 s"),
                                          (3_900_000_000_000, "1 h 5 min")])
def test_human_duration(ns, text):
    assert fleetmon.human_duration(ns) == text


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1.5h", 5400), ("90", 90), ("0.5", 0.5)])
def test_down_after_takes_seconds_or_a_unit(text, seconds):
    assert fleetmon.seconds_argument(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-5s", "0", "nan", "inf", "1e999h"])
def test_down_after_refuses_what_is_no_time(tmp_path, capsys, text):
    with pytest.raises(SystemExit):
        fleetmon.main([f"--down-after={text}", "--db", str(tmp_path / "x.db")])
    assert "is not a time: give seconds, or a number with s, m or h, like 5m" in capsys.readouterr().err


def test_online_quarters_count_the_minutes_of_each_quarter_hour_in_the_span():
    full = (1 << 60) - 1
    assert fleetmon.online_quarters({0: 0b111, 1: 1 << 59}, 2, 119) == (2, "10000001")
    assert fleetmon.online_quarters({1: full, 2: full}, 30, 185) == (120, "00ffffffff0")  # 0:30-0:59 missed, 1:00-2:59 online, 3:00-3:05 missed
    assert fleetmon.online_quarters({0: full}, 7, 22) == (16, "88")  # 7-14 and 15-22
    assert fleetmon.online_quarters({-1: full}, -1, -1) == (1, "1")  # before 1970
    assert fleetmon.online_quarters({}, 5, 9) == (0, "0")


# --- The fleet's API and device pages -----------------------------------------------------


def test_the_devices_list_by_status_a_page_at_a_time(app, client):
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT, "18-b8-87-e7-1f-06"), heartbeat(SENT_AT, "26-9a-66-01-33-83"))
        check_after(watched, 60)
        send(client, heartbeat(SENT_AT, "26-9a-66-01-33-83"), upload(1_500, device_id=DEVICE))

    def ids(query):
        response = client.get(f"/api/v1/devices{query}")
        assert response.status_code == 200
        return [d["device_id"] for d in response.get_json()["devices"]], response.get_json()["next"]

    assert ids("?status=down") == (["18-b8-87-e7-1f-06"], None)
    assert ids("?status=up") == (["26-9a-66-01-33-83", DEVICE], None)
    assert ids("?status=never") == (["38-4e-73-e0-33-59", OTHER_DEVICE], None)
    first, next_url = ids("?limit=2")
    assert (first, next_url) == (["18-b8-87-e7-1f-06", "26-9a-66-01-33-83"],
                                 "/api/v1/devices?after=26-9a-66-01-33-83&limit=2")
    assert ids(next_url.removeprefix("/api/v1/devices")) == (
        ["38-4e-73-e0-33-59", DEVICE], f"/api/v1/devices?after={DEVICE}&limit=2")
    device = client.get("/api/v1/devices?status=up").get_json()["devices"][1]
    assert device == {"device_id": DEVICE, "status": "up", "last_heard": device["last_heard"], "down_since": None,
                      "history_kept_from": None, "uptime": 0.0, "avg_upload_time": "1.5µs"}
    response = client.get("/api/v1/devices?status=late")
    assert (response.status_code, response.get_json()) == (400, {"msg": "status must be up, down or never"})


def test_each_device_has_a_page_for_a_browser_and_json_for_an_api_client(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    with watching(app, down_after=60) as watched:
        send_day(client, simulated_day(DEVICE)[:50])
        wall.ms += 61_000
        check_after(watched, 61)
        wall.ms += 60_000
        page = client.get(f"/devices/{DEVICE}", headers=HTML)
        assert (page.status_code, page.content_type, page.headers["Vary"]) == (200, "text/html; charset=utf-8", "Accept")
        text = page.get_data(as_text=True)
        assert '<span class="pill down">down</span> <span class="since">down for 2m1s</span>' in text
        assert "<td>still down</td>" in text and '<td class="num">2m1s so far</td>' in text  # its open outage
        assert client.get(f"/devices/{DEVICE}").get_json() == device_json(client)
        send(client, heartbeat(minute_of_day(500)))  # heard again: the outage ends
        assert '<td class="num">2m1s</td>' in client.get(f"/devices/{DEVICE}", headers=HTML).get_data(as_text=True)
    assert client.get("/devices/unknown", headers=HTML).status_code == 404


# --- The fleet page -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (HTML["Accept"], "text/html; charset=utf-8"),
        ("*/*", "application/json"),  # curl
        ("application/json", "application/json"),
        (None, "application/json"),
    ],
)
def test_root_is_the_fleet_page_for_a_browser_and_json_for_an_api_client(client, accept, content_type):
    response = client.get("/", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    assert response.content_type == content_type
    assert response.headers["Vary"] == "Accept"  # so that no cache serves one for the other


def fleet_page(client, query=""):
    response = client.get(f"/{query}", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def listed_ids(page):
    """The device ids of the page's rows, in order."""
    return [html.unescape(device_id) for device_id in re.findall(r'<th scope="row"><a href="[^"]*"><code>([^<]*)</code>', page)]


def summary(page):
    """The fleet page's summary, as {term: value}."""
    return dict(re.findall(r"<dt>([^<]*)</dt><dd>([^<]*)</dd>", page))


def test_the_fleet_page_lists_the_worst_uptime_first_and_silent_devices_last(client):
    page = fleet_page(client)  # a fleet that sent nothing
    assert summary(page) == {"Devices": "5", "Down": "0", "Up": "0", "Never heard": "5"}
    assert page.count("no heartbeats yet") == 5
    assert 'rel="icon" href="data:image/svg+xml,' in page  # so that no /favicon.ico is asked for
    worst, middle, best = "26-9a-66-01-33-83", "18-b8-87-e7-1f-06", "b4-45-52-a2-f1-3c"
    for device_id, minutes in ((best, range(11)), (middle, [0, 5, 10]), (worst, [0, 10])):
        for minute in minutes:
            send(client, heartbeat(minute_of_day(minute), device_id))
    send(client, upload(201_858_747_766, device_id=best))
    page = fleet_page(client)
    assert listed_ids(page) == [worst, middle, best, "38-4e-73-e0-33-59", "60-6b-44-84-dc-64"]
    assert summary(page) == {"Devices": "5", "Down": "0", "Up": "3", "Never heard": "2"}
    assert page.count('<span class="pill never">never heard</span> <span class="since">never heard</span>') == 2
    assert '<span title="3m21.858747766s (exact, over 1 uploads)">3 min 22 s</span>' in page
    assert '<span class="pct">20.000 %</span>' in page


def strips(page):
    """The online strips of a page, as (label, from, to, quarters, cell minutes)."""
    return re.findall(r'<div class="strip" role="group" aria-label="([^"]*)" title="[^"]*"\s+'
                      r'data-from="([^"]*)" data-to="([^"]*)" data-quarters="([0-9a-f]*)"\s+'
                      r'data-cell-minutes="(\d+)"></div>', page)


def test_the_online_strip_counts_minutes_as_uptime_does_by_the_quarter_hour(client):
    online = [*range(15), *range(30, 35), *range(45, 61)]  # 10:00-10:14, 10:30-10:34, 10:45-11:00
    send(client, *(heartbeat(minute_of_day(minute)) for minute in online))
    assert strips(fleet_page(client)) == [
        ("36 of 60 minutes online", "2024-01-01T10:00:00Z", "2024-01-01T11:00:00Z", "f05f1", "15")]  # 60 %, as its uptime
    send(client, *(heartbeat(minute_of_day(minute)) for minute in range(61)))
    assert strips(fleet_page(client))[0][0] == "60 of 60 minutes online"  # not "61 of 60"


def test_the_online_strip_covers_the_last_24_hours_at_most(client):
    for minute in (0, 1, 3_000, 3_001):
        send(client, heartbeat(minute_of_day(minute)))
    (label, start, end, quarters, _), = strips(fleet_page(client))
    assert (label, start, end) == ("2 of 1439 minutes online", "2024-01-02T12:02:00Z", "2024-01-03T12:01:00Z")
    assert quarters == "0" * 96 + "2"  # 12:02-12:14 on the second day, ..., 12:00-12:01 on the third
    assert strips(client.get(f"/devices/{DEVICE}", headers=HTML).get_data(as_text=True)) == [  # 7 days at most
        ("4 of 3001 minutes online", "2024-01-01T10:00:00Z", "2024-01-03T12:01:00Z", "2" + "0" * 199 + "2", "60")]


def test_device_ids_are_escaped_everywhere_on_the_fleet_page(tmp_path):
    hostile = ['<img src=x onerror=alert(1)>', '" onmouseover="alert(2)', "'><b>bold"]
    with open_app(tmp_path / "fleet.db", devices_file(tmp_path, *hostile)) as app:
        client = app.test_client()
        for device_id in hostile:
            send(client, heartbeat("2024-01-01T10:00:00Z", urllib.parse.quote(device_id, safe="")))
        page = fleet_page(client)
        assert listed_ids(fleet_page(client, "?q=onerror")) == hostile[:1]
        device_pages = [client.get(f"/devices/{urllib.parse.quote(d, safe='')}", headers=HTML).get_data(as_text=True)
                        for d in hostile]
    for html_page in (page, *device_pages):
        assert "<img" not in html_page and "<b>" not in html_page and 'onmouseover="' not in html_page
    assert sorted(listed_ids(page)) == sorted(hostile)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_fleet_page_comes_50_rows_a_page_and_filters_by_id(tmp_path):
    devices = devices_file(tmp_path, *(f"cam-{n:03d}" for n in range(119)), "caméra-ß")
    with open_app(tmp_path / "fleet.db", devices) as app:
        client = app.test_client()
        send(client, heartbeat("2024-01-01T10:00:00Z", "cam-021"))
        pages = [fleet_page(client, f"?page={number}") for number in (1, 2, 3)]
        assert [len(listed_ids(page)) for page in pages] == [50, 50, 20]
        assert listed_ids(pages[0])[0] == "cam-021"  # the one that sent something
        assert listed_ids(pages[2])[-1] == "caméra-ß"
        assert '<a href="/?page=2" rel="next">' in pages[0] and "Page 1 of 3" in pages[0]
        assert '<a href="/?page=2" rel="prev">' in pages[2]
        filtered = fleet_page(client, "?q=CAM-02")
        assert listed_ids(filtered) == ["cam-021"] + [f"cam-{n:03d}" for n in range(20, 30) if n != 21]
        assert "10 devices match" in filtered
        assert summary(filtered) == {"Matching devices": "10", "Down": "0", "Up": "1", "Never heard": "9"}
        assert listed_ids(fleet_page(client, "?q=nothing-like-it")) == []
        assert listed_ids(fleet_page(client, "?q=CAMÉRA-SS")) == ["caméra-ß"]  # case folded, not only ASCII
        assert listed_ids(fleet_page(client, "?q=cam_0")) == listed_ids(fleet_page(client, "?q=%25")) == []
        assert listed_ids(fleet_page(client, "?page=9")) == listed_ids(pages[2])  # past the end: the last
        assert client.get("/?page=0", headers=HTML).status_code == 400
        assert client.get("/?q=" + "x" * 201, headers=HTML).get_json() == {"msg": "q must be at most 200 characters"}


def test_a_filter_matching_many_devices_walks_the_index_in_the_same_order(tmp_path, monkeypatch):
    with open_app(tmp_path / "fleet.db", devices_file(tmp_path, *(f"cam-{n:03d}" for n in range(30)))) as app:
        client = app.test_client()
        for n in range(0, 30, 3):
            send(client, *(heartbeat(minute_of_day(minute), f"cam-{n:03d}") for minute in range(0, n + 2, 2)))
        sorted_matches = listed_ids(fleet_page(client, "?q=cam"))
        monkeypatch.setattr(fleetmon, "FILTER_SORTS_UP_TO", 0)
        assert listed_ids(fleet_page(client, "?q=cam")) == sorted_matches
        assert sorted_matches == listed_ids(fleet_page(client))


@pytest.fixture(scope="module")
def uptime_column():
    """A database with schema.sql's devices table and one row, to read its uptime column."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.executescript((HERE / "schema.sql").read_text(encoding="utf-8"))
        db.execute("INSERT INTO devices (device_id) VALUES ('d')")
        yield db


@given(online=st.integers(0, 10**6), first=st.integers(-10**9, 10**9), span=st.integers(0, 10**6))
def test_the_uptime_column_is_uptime_percent_to_the_last_bit(uptime_column, online, first, span):
    """The fleet page is ordered by schema.sql's uptime column, uptime_percent's twin."""
    last = first + span if online else None
    first = first if online else None
    uptime_column.execute("UPDATE devices SET online_minutes = ?, first_minute = ?, last_minute = ?",
                          (online, first, last))
    assert uptime_column.execute("SELECT uptime FROM devices").fetchone()[0] == uptime_percent(online, first, last)


def test_a_page_of_the_fleet_reads_its_counts_and_rows_along_indexes(app, client):
    pool = app.extensions["fleetmon.pool"]
    db = pool.borrow()
    ran = []
    db.set_trace_callback(ran.append)  # each statement with its parameters in place
    pool.give_back(db)  # for the page's request to borrow
    try:
        assert client.get("/", headers=HTML).status_code == 200
    finally:
        db.set_trace_callback(None)
    counts, rows = (" | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}"))
                    for statement in ran if statement.startswith("SELECT"))
    # The down and the never-heard devices counted from their small indexes alone...
    assert "SEARCH devices USING COVERING INDEX devices_down" in counts
    assert "SEARCH devices USING COVERING INDEX devices_never_heard" in counts
    # ...and a page of rows a walk along the page's order, with no sort of the whole fleet.
    assert "SCAN devices USING INDEX devices_by_concern" in rows and "TEMP B-TREE" not in rows


def test_the_fleet_page_leads_with_the_devices_down_longest(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    first_down, then_down, up = "26-9a-66-01-33-83", "18-b8-87-e7-1f-06", "b4-45-52-a2-f1-3c"
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT, up), heartbeat(minute_of_day(10), up), heartbeat(SENT_AT, first_down))
        for heard in ([then_down, up], [up], [up]):  # 30 s apart: the first down at 60 s, the second at 90 s
            wall.ms += 30_000
            check_after(watched, 30)
            send(client, *(heartbeat(SENT_AT, device_id) for device_id in heard))
        wall.ms += 30_000
        page = fleet_page(client)
    assert listed_ids(page)[:3] == [first_down, then_down, up]
    assert summary(page) == {"Devices": "5", "Down": "2", "Up": "1", "Never heard": "2"}
    assert summary(fleet_page(client, "?q=-8")) == {"Matching devices": "3", "Down": "2", "Up": "0", "Never heard": "1"}
    assert '<span class="pill down">down</span> <span class="since">down for 2m</span>' in page
    assert '<span class="pill down">down</span> <span class="since">down for 1m30s</span>' in page
    assert '<span class="since">last heard 30s ago</span>' in page


# --- Saying so: alert delivery, /metrics --------------------------------------------------


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


def test_alerts_are_delivered_in_order_and_retried_with_backoff_after_a_failure(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT))
        wall.ms += 300_000
        check_after(watched, 60)
        wall.ms += 132_000
        send(client, heartbeat(SENT_AT))
        check_after(watched, 0)
    assert watched.lines == [f"fleetmon: {DEVICE} is down (last heard 10:04:00 UTC, 5m ago)",
                             f"fleetmon: {DEVICE} is up again after 7m12s"]
    lines = []
    nowhere = f"http://127.0.0.1:{unused_port()}/hook"
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        delivery = fleetmon.AlertDelivery(nowhere, announce=lines.append)
        assert delivery.step(db, monotonic_now=10) == 0
        assert delivery.step(db, monotonic_now=10.5) == 0  # not before its retry is due
        assert delivery.step(db, monotonic_now=11) == 0
        assert [re.sub(r"hook: .*;", "hook: (why);", line) for line in lines] == [
            f"fleetmon: alert 1 ({DEVICE} down) not delivered to {nowhere}: (why); trying again in 1s",
            f"fleetmon: alert 1 ({DEVICE} down) not delivered to {nowhere}: (why); trying again in 2s",
        ]
        with alert_receiver() as (url, taken, _):
            delivery.url = url
            assert delivery.step(db, monotonic_now=13) == 2
            assert delivery.step(db, monotonic_now=14) == 0  # each delivered once
    assert taken == [
        {"id": 1, "device_id": DEVICE, "status": "down", "at": "2024-01-01T10:09:00.000Z",
         "last_heard": "2024-01-01T10:04:00.000Z", "outage_seconds": None,
         "text": f"fleetmon: {DEVICE} is down (last heard 10:04:00 UTC, 5m ago)"},
        {"id": 2, "device_id": DEVICE, "status": "up", "at": "2024-01-01T10:11:12.000Z",
         "last_heard": "2024-01-01T10:04:00.000Z", "outage_seconds": 432.0,
         "text": f"fleetmon: {DEVICE} is up again after 7m12s"},
    ]


def test_an_alert_not_delivered_before_kill_9_is_delivered_after_the_restart(tmp_path):
    database = tmp_path / "fleetmon.db"
    nowhere = f"http://127.0.0.1:{unused_port()}/hook"
    with server_process("--port", "0", "--db", str(database), "--down-after", "0.2s",
                        "--alert-url", nowhere) as (_, port, _, wait_for):
        with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
            assert http_request(connection, "POST", heartbeat_url(), {"sent_at": SENT_AT})[0] == 204
        assert wait_for("is down").startswith(f"fleetmon: {DEVICE} is down (last heard ")
        assert wait_for("not delivered").startswith(f"fleetmon: alert 1 ({DEVICE} down) not delivered to {nowhere}")
    with alert_receiver() as (url, taken, arrived), \
            server_process("--port", "0", "--db", str(database), "--alert-url", url):
        assert arrived.wait(timeout=60)
    assert [(alert["id"], alert["device_id"], alert["status"]) for alert in taken] == [(1, DEVICE, "down")]


def test_metrics_are_prometheus_text_naming_each_device_only_in_a_small_fleet(app, client, monkeypatch):
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE), upload(5))
        check_after(watched, 60)
        send(client, heartbeat(SENT_AT))
    client.post(heartbeat_url(), data=b"{")
    response = client.get("/metrics")
    assert (response.status_code, response.content_type) == (200, prometheus_client.CONTENT_TYPE_LATEST)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(response.get_data(as_text=True))
               for sample in family.samples}
    assert {labels: value for (name, labels), value in samples.items() if name == "fleetmon_devices"} == {
        (("status", "up"),): 1, (("status", "down"),): 1, (("status", "never"),): 3}
    assert samples[("fleetmon_alerts_total", (("status", "down"),))] == 2
    assert samples[("fleetmon_alerts_total", (("status", "up"),))] == 1
    assert samples[("fleetmon_telemetry_total", (("kind", "heartbeat"),))] == 3
    assert samples[("fleetmon_telemetry_total", (("kind", "upload"),))] == 1
    assert samples[("fleetmon_requests_total", (("endpoint", "api.post_heartbeat"), ("status", "400")))] == 1
    assert samples[("fleetmon_device_up", (("device_id", DEVICE),))] == 1
    assert samples[("fleetmon_device_up", (("device_id", OTHER_DEVICE),))] == 0
    assert samples[("fleetmon_device_uptime_percent", (("device_id", DEVICE),))] == 100.0
    served = client.get("/openapi.json").get_json()["paths"]["/metrics"]["get"]["responses"]["200"]
    example = served["content"]["text/plain"]["example"]  # shows the series a scrape has, in its order
    assert list(dict.fromkeys(name for name, _ in samples)) == list(dict.fromkeys(
        sample.name for family in text_string_to_metric_families(example) for sample in family.samples))
    monkeypatch.setattr(fleetmon, "METRICS_PER_DEVICE_UP_TO", 4)
    text = client.get("/metrics").get_data(as_text=True)
    assert "fleetmon_devices{" in text and "fleetmon_device_up" not in text
