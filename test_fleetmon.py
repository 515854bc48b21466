"""fleetmon's tests: the pure maths, every answer of the HTTP API as the spec's examples,
storage, and fleetmon's own waitress server under concurrent load and kill -9.

Run with ``python -m pytest``.
"""

import base64
import html
import importlib.metadata
import itertools
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection, HTTPException
from pathlib import Path

import pytest
import waitress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waitress import wasyncore

import fleetmon
import simulator
from fleetmon import (
    INT64_MAX,
    StartupError,
    create_app,
    format_duration,
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

# One randomness policy for the whole suite: the property tests, like every other test,
# run the same examples on every run (derandomize), so that CI cannot fail one day on a
# rare example and pass the next, and a failure comes back when the suite is run again.
# Looking for new examples is a deliberate, local act:
#     FLEETMON_HYPOTHESIS=explore python -m pytest -k any_
# runs ten times the examples, new ones each run, and keeps any that fails in .hypothesis/
# to try first next time. (An environment variable: pytest reads --hypothesis-profile
# before this module registers its profiles.) No deadline in either: it is a timing assert.
# The property tests reuse one app across examples on purpose (see "Hostile input").
SHARED_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("repeatable", derandomize=True, max_examples=150, **SHARED_SETTINGS)
settings.register_profile("explore", max_examples=1_500, **SHARED_SETTINGS)
settings.load_profile(os.environ.get("FLEETMON_HYPOTHESIS", "repeatable"))

# A thread that dies of an exception (waitress's loop, a client) fails its test, not just warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


# --- Fixtures and helpers -----------------------------------------------------------


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


def upload(upload_time, sent_at="2024-01-01T10:04:00Z", device_id=DEVICE, **more_fields):
    return stats_url(device_id), {"sent_at": sent_at, "upload_time": upload_time, **more_fields}


def send(client, *requests):
    """POST each (path, body), asserting the 204: a test never builds on a refused write."""
    for path, body in requests:
        response = client.post(path, json=body)
        assert response.status_code == 204, (path, body, response.get_json())


def send_day(client, telemetry):
    send(client, *((event.path, event.body) for event in telemetry))


def write(path, content):
    path.write_bytes(content)
    return path


def stored(app, tables=("heartbeat_minutes", "uploads", "device_stats")):
    """What the database holds, to show that a rejected request changed nothing."""
    # sqlite3's `with connect(...)` commits or rolls back but never closes the
    # connection; closing() does, as every test here must (3.13 warns of one left open).
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}


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
        # First the worker thread, so that no task is left to write to a closed channel.
        # Then the sockets, closed by the loop itself between two select() calls: closed
        # from this thread, they could vanish under a select() still watching them
        # (EBADF). With every socket closed its map (waitress's _map) is empty, and the
        # loop returns.
        server.task_dispatcher.shutdown()
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        loop.join(timeout=30)
        assert not loop.is_alive(), "waitress's loop did not stop"


@contextmanager
def waitress_server(app):
    """fleetmon's own waitress server for app on a free loopback port; yields the port."""
    with running(fleetmon.create_server(app, "127.0.0.1", 0)) as server:
        yield server.effective_port


def read_lines(stream, lines):
    for line in stream:
        lines.put(line)
    lines.put(None)  # the end of its output


@contextmanager
def server_process(*args, start_timeout=60):
    """`python fleetmon.py *args`, until it prints where it listens.

    Yields the process, its port and what it printed; kills it after. A pipe's
    readline() cannot time out on every system (Windows has no select() on pipes), so a
    thread reads the lines into a queue, which can, and keeps reading while it runs.
    """
    process = subprocess.Popen([sys.executable, str(HERE / "fleetmon.py"), *args], stdout=subprocess.PIPE, text=True)
    lines = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), name="server output")
    reader.start()
    try:
        printed = []
        while not printed or "listening on" not in printed[-1]:
            try:
                printed.append(lines.get(timeout=start_timeout))
            except queue.Empty:
                pytest.fail(f"no start line within {start_timeout} s: {printed}")
            assert printed[-1] is not None, f"the server stopped before listening: {printed}"
        yield process, int(re.search(r"http://127\.0\.0\.1:(\d+)/", printed[-1]).group(1)), printed
    finally:
        process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean shutdown
        process.wait()
        reader.join()
        process.stdout.close()


# --- Maths: Go's time.Duration.String() ----------------------------------------------

# Each right-hand side is what Go prints for time.Duration(left).String() (checked
# against go1.19), the vendor's simulator's published means included.
GO_DURATIONS = [
    (0, "0s"),
    (1, "1ns"),
    (999, "999ns"),
    (1_000, "1\u00b5s"),  # the micro sign, as Go writes it, not the Greek mu U+03BC
    (1_500, "1.5µs"),
    (1_001, "1.001µs"),
    (999_999, "999.999µs"),
    (1_000_000, "1ms"),
    (1_100_000, "1.1ms"),
    (999_999_999, "999.999999ms"),
    (1_000_000_000, "1s"),
    (1_000_000_001, "1.000000001s"),
    (1_500_000_000, "1.5s"),
    (59_999_999_999, "59.999999999s"),
    (60_000_000_000, "1m0s"),
    (61_000_000_000, "1m1s"),
    (3_599_999_999_999, "59m59.999999999s"),
    (3_600_000_000_000, "1h0m0s"),
    (3_723_000_000_001, "1h2m3.000000001s"),
    (3_723_100_000_000, "1h2m3.1s"),
    (90_000_000_000_000, "25h0m0s"),
    (2**53 + 1, "2501h59m59.254740993s"),
    (INT64_MAX, "2562047h47m16.854775807s"),
    (-1, "-1ns"),
    (-1_500, "-1.5µs"),
    (-3_600_000_000_000, "-1h0m0s"),
    (-(2**63), "-2562047h47m16.854775808s"),
    *((published.mean_ns, published.avg_upload_time) for published in PUBLISHED_DAYS.values()),
]


@pytest.mark.parametrize(("ns", "text"), GO_DURATIONS)
def test_format_duration_matches_go(ns, text):
    assert format_duration(ns) == text


@pytest.mark.parametrize(
    ("total_ns", "count", "mean"),
    [(0, 0, 0), (7, 1, 7), (10, 3, 3), (11, 3, 3), (18_789_337_913_437, 100, 187_893_379_134),
     (INT64_MAX, 1, INT64_MAX), (INT64_MAX, 2, 4_611_686_018_427_387_903)],
)
def test_mean_ns_truncates(total_ns, count, mean):
    assert mean_ns(total_ns, count) == mean


# --- Maths: uptime and sent_at --------------------------------------------------------


@pytest.mark.parametrize(
    ("online", "first", "last", "uptime"),
    [
        (0, None, None, 0.0),  # uploads only
        (1, 1000, 1000, 100.0),  # one online minute
        (479, 0, 480, 99.79166666666667),  # the span is exclusive (not 479 / 481); not rounded
        (446, 0, 480, 446 / 480 * 100),
        (480, 0, 480, 100.0),
        (481, 0, 480, 100.0),  # online in every minute of the span: capped
        (2, 5, 6, 100.0),
        (2, -10, 50, 2 / 60 * 100),  # minutes before 1970 are fine
    ],
)
def test_uptime_percent(online, first, last, uptime):
    assert uptime_percent(online, first, last) == uptime


@pytest.mark.parametrize(
    ("sent_at", "minute"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:59.999999999Z", 0),  # seconds are dropped, not rounded
        ("1970-01-01T00:01:00Z", 1),
        ("1969-12-31T23:59:59Z", -1),
        ("1970-01-01T01:00:00+01:00", 0),  # offsets are normalised to UTC
        ("1969-12-31T19:00:30-05:00", 0),
        ("1970-01-01T05:30:00+05:30", 0),
        ("1970-01-01T00:00:00-00:00", 0),
        ("2024-01-01T10:04:00Z", 28_401_724),
        ("2024-01-01T10:04:00.5Z", 28_401_724),
        ("2024-01-01T10:04:00.123456789+00:00", 28_401_724),
        ("2024-02-29T00:00:00Z", 28_486_080),  # leap day
        ("0001-01-01T00:00:00Z", -1_035_593_280),
        ("9999-12-31T23:59:59Z", 4_223_371_679),
    ],
)
def test_utc_minute(sent_at, minute):
    assert utc_minute(sent_at) == minute


@pytest.mark.parametrize(
    "sent_at",
    [
        "",
        "2024-01-01T10:04:00",  # no offset
        "2024-01-01",  # a date alone
        "10:04:00Z",
        "2024-01-01 10:04:00Z",  # a space instead of T
        "2024-01-01t10:04:00z",  # Go and JSON Schema want upper case too
        "2024-01-01T10:04Z",  # no seconds
        "2024-01-01T10:04:00.Z",
        "2024-01-01T10:04:00.1234567890Z",  # more than nanoseconds
        "2024-01-01T10:04:00+0100",
        "2024-01-01T10:04:00+01",
        "2024-01-01T10:04:00+24:00",
        "2024-01-01T10:04:00+01:60",
        "2024-13-01T10:04:00Z",
        "2024-02-30T10:04:00Z",
        "2023-02-29T10:04:00Z",  # not a leap year
        "2024-01-01T24:00:00Z",
        "2024-01-01T10:60:00Z",
        "2024-01-01T10:04:60Z",  # leap seconds: Go rejects them too
        "0000-01-01T00:00:00Z",  # there is no year 0
        "0001-01-01T00:00:00+00:01",  # year 0 in UTC
        "9999-12-31T23:59:59-00:01",  # year 10000 in UTC
        "+2024-01-01T10:04:00Z",
        "2024-01-01T10:04:00Z\n",
        " 2024-01-01T10:04:00Z",
        "２０２４-01-01T10:04:00Z",  # digits, but not ASCII ones
        "Mon, 01 Jan 2024 10:04:00 GMT",
        "1704103440",
    ],
)
def test_utc_minute_rejects(sent_at):
    with pytest.raises(ValueError):
        utc_minute(sent_at)


@pytest.mark.parametrize("text", ["2024-01-01T10:04:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:00Z"])
def test_minute_to_rfc3339_inverts_utc_minute(text):
    assert minute_to_rfc3339(utc_minute(text)) == text


# --- Devices file ----------------------------------------------------------------------


def test_the_shipped_devices_are_the_simulators(app):
    assert app.config["DEVICE_IDS"] == set(PUBLISHED_DAYS)


def test_load_device_ids_tolerates_what_spreadsheets_write(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_bytes(b"\xef\xbb\xbf name , device_id \r\nA, aa-01 \r\n\r\nB,bb-02\r\nC,aa-01\r\nD,\r\nE\r\n")
    assert load_device_ids(path) == {"aa-01", "bb-02"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read devices file {path}: No such file or directory"),
        (b"", "devices file {path} has no device_id column in its first line"),
        (b"id\n60-6b-44-84-dc-64\n", "devices file {path} has no device_id column in its first line"),
        (b"device_id\n\xff\xfe\n", "devices file {path} is not UTF-8 text"),
        (b"device_id\n", "devices file {path} lists no devices under device_id"),
        (b"name,device_id\nA, \n\nB\n", "devices file {path} lists no devices under device_id"),
        (b"device_id\naa-01\n\nbb/02\n",
         "devices file {path}, line 4: device id 'bb/02' contains '/', which no URL can carry"),
    ],
)
def test_load_device_ids_refuses_a_file_it_cannot_serve(tmp_path, content, message):
    path = tmp_path / "devices.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StartupError) as refused:
        load_device_ids(path)
    assert str(refused.value) == message.format(path=path)


def test_a_bad_devices_file_stops_the_start_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.csv"
    run = subprocess.run(
        [sys.executable, str(HERE / "fleetmon.py"), "--devices", str(missing), "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"fleetmon: cannot read devices file {missing}: No such file or directory\n"


# --- HTTP: the three contract endpoints ------------------------------------------------


def test_a_heartbeat_is_an_empty_204_and_marks_its_utc_minute_online(app, client):
    response = client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:04:31+02:00"})
    assert (response.status_code, response.data) == (204, b"")
    assert "Content-Type" not in response.headers
    assert stored(app)["heartbeat_minutes"] == [(DEVICE, utc_minute("2024-01-01T08:04:00Z"))]


def test_an_upload_is_an_empty_204_and_stored_as_sent(app, client):
    response = client.post(stats_url(), json={"sent_at": "2024-01-01T10:04:00.123456789-05:00",
                                              "upload_time": 187_893_379_134})
    assert (response.status_code, response.data) == (204, b"")
    assert stored(app)["uploads"] == [(1, DEVICE, "2024-01-01T10:04:00.123456789-05:00", 187_893_379_134)]


def test_stats_are_an_empty_204_until_the_device_sends_something(client):
    response = client.get(stats_url())
    assert (response.status_code, response.data) == (204, b"")


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


def test_devices_are_kept_apart(client):
    send(client, upload(5, device_id=DEVICE))
    assert client.get(stats_url(DEVICE)).status_code == 200
    assert client.get(stats_url(OTHER_DEVICE)).status_code == 204


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_the_body_is_json_whatever_its_content_type(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(heartbeat_url(), data='{"sent_at": "2024-01-01T10:04:00Z"}', headers=headers)
    assert response.status_code == 204


# --- HTTP: errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_id",
    ["unknown", "60-6b-44-84-dc-6", "60-6B-44-84-DC-64", " 60-6b-44-84-dc-64", "'; DROP TABLE device_stats; --",
     "60-6b-44-84-dc-64' OR '1'='1", "%", "_" * 17, "x" * 5_000, "é", "\x00"],
)
def test_an_unknown_device_is_404_before_the_body_is_read(client, device_id):
    for method, path in (("POST", heartbeat_url(device_id)), ("POST", stats_url(device_id)),
                         ("GET", stats_url(device_id)), ("GET", f"/debug/stats/{device_id}")):
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
    ],
)
def test_a_wrong_method_is_405_with_allow(client, path, method, allow):
    response = client.open(path, method=method, data=b"not json")
    assert response.status_code == 405
    assert response.get_json() == {"msg": "The method is not allowed for the requested URL."}
    assert sorted(response.headers["Allow"].split(", ")) == allow.split(", ")


@pytest.mark.parametrize(
    "path",
    ["/api/v1/devices", "/api/v1/devices/60-6b-44-84-dc-64", "/api/v1/devices/60-6b/44-84-dc-64/stats",
     "/api/v1//devices/60-6b-44-84-dc-64/stats", "/api/v2/x", "/favicon.ico"],
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
SENT_AT = "2024-01-01T10:04:00Z"


@pytest.mark.parametrize(
    ("path", "body", "msg"),
    [
        *refusals(BOTH, "body is not valid JSON", b"", b"{", b"sent_at=2024-01-01T10:04:00Z", b"\xff\xfe{}",
                  '{"sent_at": "2024-01-01T10:04:00Z"}'.encode("utf-16"),
                  b'{"sent_at": "2024-01-01T10:04:00Z", "x": NaN}', b'{"sent_at": "2024-01-01T10:04:00Z"} {}'),
        *refusals(BOTH, "body is nested too deeply", b"[" * 60_000),
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
    assert client.get(stats_url()).get_json()["avg_upload_time"] == format_duration(INT64_MAX // 2)


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
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        db.execute("DROP TABLE uploads")
    before = stored(app, ("heartbeat_minutes", "device_stats"))
    response = client.post(stats_url(), json={"sent_at": SENT_AT, "upload_time": 5})
    assert response.status_code == 500
    assert response.get_json() == {
        "msg": "The server encountered an internal error and was unable to complete your request. "
               "Either the server is overloaded or there is an error in the application."
    }
    assert stored(app, ("heartbeat_minutes", "device_stats")) == before
    assert "no such table: uploads" in caplog.text


# --- Storage ----------------------------------------------------------------------------


def test_a_restart_on_the_same_database_gives_the_same_stats(app, client):
    send_day(client, simulated_day(DEVICE)[:300])
    with open_app(app.config["DATABASE"]) as restarted:  # schema.sql applied again
        assert restarted.test_client().get(stats_url()).get_json() == client.get(stats_url()).get_json()
        assert stored(restarted) == stored(app)


def test_the_aggregates_match_the_raw_rows(app, client):
    send_day(client, simulated_day(DEVICE)[:300])
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        raw = db.execute(
            "SELECT count(*), min(minute), max(minute) FROM heartbeat_minutes WHERE device_id = ?", (DEVICE,)
        ).fetchone() + db.execute(
            "SELECT count(*), sum(upload_time_ns) FROM uploads WHERE device_id = ?", (DEVICE,)
        ).fetchone()
        aggregates = db.execute(
            "SELECT online_minutes, first_minute, last_minute, upload_count, upload_total_ns"
            " FROM device_stats WHERE device_id = ?", (DEVICE,)
        ).fetchone()
    assert aggregates == raw


def test_the_database_is_in_wal_mode(app):
    with closing(sqlite3.connect(app.config["DATABASE"])) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# --- A real server ---------------------------------------------------------------------


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

    with server_process("--port", "0", "--db", str(database)) as (process, port, printed):
        url = f"http://127.0.0.1:{port}"
        assert printed == [
            f"fleetmon: 5 devices from {DEVICES_CSV}, database {database}\n",
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
        minutes = {minute for (_, minute) in stored(restarted)["heartbeat_minutes"]}
        assert minutes.issuperset(acknowledged)
        debug = restarted.test_client().get(f"/debug/stats/{DEVICE}").get_json()
        assert debug["online_minutes"] == len(minutes)  # the aggregates committed with the rows


# --- The document, the docs page, the root and the debug views -------------------------


def test_openapi_json_is_the_shipped_file_naming_the_server_that_answered(client):
    response = client.get("/openapi.json", base_url="http://127.0.0.1:7000")
    assert (response.status_code, response.content_type) == (200, "application/json")
    document = response.get_json()
    assert document["servers"] == [{"url": "http://127.0.0.1:7000", "description": "this fleetmon"}]
    shipped = json.loads((HERE / "openapi.json").read_text(encoding="utf-8"))
    assert {**document, "servers": shipped["servers"]} == shipped


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
    assert client.get("/docs").status_code == 308
    assert client.get("/docs").headers["Location"].endswith("/docs/")
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
    assert response.get_json() == {
        "name": "fleetmon",
        "version": "1.0.0",
        "devices": 5,
        "links": {
            "fleet_page": "/",
            "docs": "/docs/",
            "openapi": "/openapi.json",
            "example_stats": "/api/v1/devices/18-b8-87-e7-1f-06/stats",
        },
    }
    assert client.get(response.get_json()["links"]["example_stats"]).status_code == 204


def test_debug_devices_lists_what_each_device_sent(client):
    send(client, heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:00:30Z"),
         upload(1, device_id=OTHER_DEVICE))
    response = client.get("/debug/devices")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == {"devices": [
        {"device_id": "18-b8-87-e7-1f-06", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "26-9a-66-01-33-83", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "38-4e-73-e0-33-59", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "60-6b-44-84-dc-64", "has_sent": True, "online_minutes": 1, "upload_count": 0},
        {"device_id": "b4-45-52-a2-f1-3c", "has_sent": True, "online_minutes": 0, "upload_count": 1},
    ], "next": None}


def test_a_device_dropped_from_the_devices_file_is_no_longer_listed(app, tmp_path):
    (tmp_path / "fewer.csv").write_text(f"device_id\n{DEVICE}\n")
    with open_app(app.config["DATABASE"], tmp_path / "fewer.csv") as fewer:
        devices = fewer.test_client().get("/debug/devices").get_json()["devices"]
    assert [device["device_id"] for device in devices] == [DEVICE]


def test_debug_stats_show_the_telemetry_behind_the_stats(client):
    assert client.get(f"/debug/stats/{DEVICE}").get_json() == {
        "device_id": DEVICE, "online_minutes": 0, "first_online_minute": None, "last_online_minute": None,
        "upload_count": 0, "upload_total_ns": 0, "stats": None,
    }
    send_day(client, simulated_day(DEVICE))
    response = client.get(f"/debug/stats/{DEVICE}")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == {
        "device_id": DEVICE,
        "online_minutes": 479,
        "first_online_minute": "2024-01-01T10:00:00Z",
        "last_online_minute": "2024-01-01T18:00:00Z",
        "upload_count": 100,
        "upload_total_ns": 18_789_337_913_499,
        "stats": {"uptime": 479 / 480 * 100, "avg_upload_time": "3m7.893379134s"},
    }
    assert response.get_json()["stats"] == client.get(stats_url()).get_json()


# --- Hostile input ------------------------------------------------------------------------

# Each example reuses the test's app: the database grows, and every example must leave it
# unchanged unless it was answered 204.
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
@given(body=st.binary(max_size=2_000))
def test_any_bytes_as_body(app, client, path, body):
    before = stored(app)
    assert_answered_safely(app, client.post(path, data=body), before)


@pytest.mark.parametrize("path", BOTH)
@given(body=json_values | bodies)
def test_any_json_as_body(app, client, path, body):
    before = stored(app)
    assert_answered_safely(app, client.post(path, data=json.dumps(body)), before)


# A "/" is no part of an id but a path separator: test_an_unknown_path_is_404_json. The
# listed ids are left out: Hypothesis draws strings from fleetmon.py's source too.
@given(device_id=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/"), min_size=1)
       .filter(lambda text: text not in PUBLISHED_DAYS))
def test_any_device_id(app, client, device_id):
    before = stored(app)
    quoted = urllib.parse.quote(device_id, safe="")
    for method, path in (("POST", heartbeat_url(quoted)), ("POST", stats_url(quoted)),
                         ("GET", stats_url(quoted)), ("GET", f"/debug/stats/{quoted}")):
        response = client.open(path, method=method, json={"sent_at": SENT_AT, "upload_time": 1})
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
        assert (DEVICE, minute_by_strptime(sent_at)) in stored(app)["heartbeat_minutes"]


# --- A real server: connections, limits and malformed HTTP -------------------------------


def raw_exchange(port, data, timeout=10):
    """Send raw bytes and read until the server closes the connection (a TimeoutError if
    it does not); the bytes read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def minute_of_day(minute):
    """A sent_at that many minutes into the simulated day: minute_of_day(3) is 10:03."""
    return minute_to_rfc3339(utc_minute("2024-01-01T10:00:00Z") + minute)


def heartbeat_request(minute=0, extra_headers=b""):
    body = json.dumps({"sent_at": minute_of_day(minute)}).encode()
    return (f"POST {heartbeat_url()} HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: {len(body)}\r\n".encode()
            + extra_headers + b"\r\n" + body)


def test_a_connection_stays_open_after_a_204(app):
    with waitress_server(app) as port:
        connection = HTTPConnection("127.0.0.1", port, timeout=10)
        with closing(connection):
            assert http_request(connection, "POST", heartbeat_url(), {"sent_at": "2024-01-01T10:00:00Z"}) == (204, b"")
            first_socket = connection.sock
            assert first_socket is not None  # http.client drops a socket the server closes
            assert http_request(connection, "POST", heartbeat_url(), {"sent_at": "2024-01-01T10:01:00Z"}) == (204, b"")
            assert connection.sock is first_socket


def test_pipelined_heartbeats_are_all_answered_on_one_connection(app):
    with waitress_server(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(heartbeat_request(minute) for minute in range(50)))
        answers = b""
        while answers.count(b"HTTP/1.1 204") < 50 and (chunk := sock.recv(65536)):
            answers += chunk
    assert answers.count(b"HTTP/1.1 204") == 50
    assert b"Connection: close" not in answers
    assert len(stored(app)["heartbeat_minutes"]) == 50


def test_connection_close_from_the_client_is_honoured(app):
    with waitress_server(app) as port:
        answer = raw_exchange(port, heartbeat_request(extra_headers=b"Connection: close\r\n"))
    assert answer.startswith(b"HTTP/1.1 204")
    assert b"Connection: close" in answer  # and raw_exchange saw the server close


def test_keep_alive_after_204_is_still_needed_in_this_waitress():
    """Stock waitress closes after a 204, which fleetmon.KeepAliveTask undoes. When this
    fails, a waitress release keeps the connection itself (upstream pull request
    Pylons/waitress#502): delete KeepAliveTask, and this test."""
    assert importlib.metadata.version("waitress") == "3.0.2", "KeepAliveTask was written against waitress 3.0.2"

    def no_content(environ, start_response):
        start_response("204 No Content", [])
        return []

    server = waitress.create_server(no_content, host="127.0.0.1", port=0)
    with running(server):
        answer = raw_exchange(server.effective_port, heartbeat_request())
    assert b"Connection: close" in answer


def test_hundreds_of_idle_and_slow_connections_do_not_lock_clients_out(app):
    with waitress_server(app) as port, ExitStack() as sockets:
        for number in range(400):
            sock = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            if number % 2:
                sock.sendall(b"POST / HTTP/1.1\r\nX-Slow: ")  # a header that never ends
        connection = HTTPConnection("127.0.0.1", port, timeout=5)
        with closing(connection):
            assert http_request(connection, "GET", stats_url()) == (204, b"")


def test_idle_connections_are_dropped_within_seconds(app, monkeypatch):
    settings = fleetmon.WAITRESS_SETTINGS
    assert settings["channel_timeout"] + settings["cleanup_interval"] <= 30
    assert 400 < settings["connection_limit"] < 500  # Windows' select() watches 512 sockets at most
    # The same settings, shortened, reach the server: an idle connection is closed.
    monkeypatch.setitem(settings, "channel_timeout", 1)
    monkeypatch.setitem(settings, "cleanup_interval", 1)
    with waitress_server(app) as port:
        assert raw_exchange(port, b"") == b""


def test_a_body_far_over_the_limit_is_refused_before_it_is_sent(app):
    with waitress_server(app) as port:
        headers = f"POST {heartbeat_url()} HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 20000000\r\n\r\n"
        answer = raw_exchange(port, headers.encode())  # and not one byte of the body
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large")
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"msg": "Request Entity Too Large: exceeds max_body of 65537"}


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400 Bad Request"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", b"400 Bad Request"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400 Bad Request"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501 Not Implemented"),
        # Exactly the 256 KiB limit and no end, so the server reads it all before answering.
        (b"GET / HTTP/1.1\r\nX-Big: ".ljust(256 * 1024, b"x"), b"431 Request Header Fields Too Large"),
    ],
)
def test_http_the_server_layer_refuses_is_answered_in_json(app, request_bytes, status):
    with waitress_server(app) as port:
        answer = raw_exchange(port, request_bytes)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert status in head.split(b"\r\n")[0]
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["msg"]


def test_a_double_slash_is_an_unknown_path_not_a_redirect(app):
    with waitress_server(app) as port:
        answer = raw_exchange(port, b"GET /api/v1/devices//stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    assert b"Content-Type: application/json" in answer


# --- Start-up mistakes ----------------------------------------------------------------------


def start_with(capsys, *args):
    """fleetmon's exit status and what it printed for args, when it does not start."""
    status = fleetmon.main(list(map(str, args)))
    printed = capsys.readouterr()
    assert printed.out == ""
    return status, printed.err


@pytest.mark.parametrize(
    ("make_db", "error"),
    [
        (lambda tmp: tmp / "missing" / "fleetmon.db", "unable to open database file"),
        (lambda tmp: tmp, "unable to open database file"),
        (lambda tmp: write(tmp / "notes.txt", b"not a database, just text " * 100), "file is not a database"),
    ],
)
def test_an_unusable_database_stops_the_start_with_one_line(tmp_path, capsys, make_db, error):
    database = make_db(tmp_path)
    assert start_with(capsys, "--db", database) == (1, f"fleetmon: cannot use database {database}: {error}\n")


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, printed = start_with(capsys, "--port", port, "--db", tmp_path / "fleetmon.db")
    assert (status, printed) == (
        1, f"fleetmon: cannot listen on 127.0.0.1:{port}: the port is in use (another fleetmon? --port chooses another)\n"
    )


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_a_port_outside_0_to_65535_is_refused(tmp_path, capsys, port):
    assert start_with(capsys, "--port", port) == (1, f"fleetmon: port {port} is outside 0-65535\n")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"device_id\n", "lists no devices under device_id"),
        (b"device_id\n\n  \n", "lists no devices under device_id"),
        (b"device_id\naa-01\ncams/aa-02\n", "line 3: device id 'cams/aa-02' contains '/', which no URL can carry"),
    ],
)
def test_a_devices_file_without_usable_devices_stops_the_start(tmp_path, capsys, content, error):
    devices = write(tmp_path / "devices.csv", content)
    status, printed = start_with(capsys, "--devices", devices, "--db", tmp_path / "fleetmon.db")
    assert status == 1
    assert printed in (f"fleetmon: devices file {devices} {error}\n", f"fleetmon: devices file {devices}, {error}\n")


def test_one_device_is_one_device_in_the_start_line(tmp_path):
    devices = write(tmp_path / "devices.csv", f"device_id\n{DEVICE}\n".encode())
    with server_process("--port", "0", "--devices", str(devices), "--db", str(tmp_path / "x.db")) as (_, _, printed):
        assert printed[0] == f"fleetmon: 1 device from {devices}, database {tmp_path / 'x.db'}\n"


# --- Recovering from a database error -------------------------------------------------------


def read_only(database):
    return sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)


def on_a_full_disk(database):
    db = fleetmon.connect(database)
    db.execute("PRAGMA max_page_count = 1")  # no more pages than it has: a write that needs one fails
    return db


@pytest.mark.parametrize("broken_connect", [read_only, on_a_full_disk])
def test_after_a_write_fails_the_next_request_starts_afresh(app, client, monkeypatch, broken_connect):
    """As when the database file was read-only, or the disk full, and then mended."""
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer 500 as in production
    real_connect = fleetmon.connect
    monkeypatch.setattr(fleetmon, "connect", broken_connect)
    minute = 0
    while client.post(heartbeat_url(), json={"sent_at": minute_of_day(minute)}).status_code == 204:
        minute += 1
        assert minute < 1_000, "the broken connection never failed"
    monkeypatch.setattr(fleetmon, "connect", real_connect)
    send(client, heartbeat(minute_of_day(minute)))
    assert len(stored(app)["heartbeat_minutes"]) == minute + 1


# --- Errors that say what happened ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 60_000, "body is nested too deeply"),
        (b'{"sent_at": "2024-01-01T10:04:00Z", "n": ' + b"9" * 4_301 + b"}", "body has an integer of more than 4300 digits"),
    ],
)
def test_json_python_cannot_read_says_why(client, body, message):
    response = client.post(heartbeat_url(), data=body)
    assert (response.status_code, response.get_json()) == (400, {"msg": message})


def test_options_on_an_unknown_device_is_404(client):
    assert client.options(stats_url()).status_code == 200
    response = client.options(stats_url("unknown"))
    assert (response.status_code, response.get_json()) == (404, {"msg": "device not found"})


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "POST"])
def test_the_docs_page_takes_only_get(client, method):
    response = client.open("/docs/", method=method)
    assert response.status_code == 405
    assert sorted(response.headers["Allow"].split(", ")) == ["GET", "HEAD", "OPTIONS"]


# --- The debug views, a page at a time ------------------------------------------------------


def test_debug_devices_come_a_page_at_a_time(client):
    seen, url = [], "/debug/devices?limit=2"
    while url:
        answer = client.get(url).get_json()
        seen.append([device["device_id"] for device in answer["devices"]])
        url = answer["next"]
    assert seen == [sorted(PUBLISHED_DAYS)[0:2], sorted(PUBLISHED_DAYS)[2:4], sorted(PUBLISHED_DAYS)[4:5]]


def test_debug_devices_has_no_next_page_after_the_last_device(client):
    assert client.get("/debug/devices?limit=5").get_json()["next"] is None


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=ten", "limit=-1", "limit=²"])
def test_debug_devices_limit_is_1_to_1000(client, query):
    response = client.get(f"/debug/devices?{query}")
    assert (response.status_code, response.get_json()) == (400, {"msg": "limit must be a whole number from 1 to 1000"})


# --- Activity in the server window ---------------------------------------------------------


def test_activity_is_one_line_per_interval_and_nothing_while_idle(app, client):
    activity = fleetmon.Activity()
    app.after_request(activity.count)
    assert activity.take_line(10) is None
    for minute in range(3):
        send(client, heartbeat(minute_of_day(minute)))
    send(client, upload(5))
    client.get(stats_url())
    client.get("/")  # not telemetry: not counted
    client.post(heartbeat_url(), data=b"{")
    client.post(heartbeat_url(), data=b"[]")
    client.get(stats_url("unknown"))
    assert activity.take_line(10) == (
        "fleetmon: last 10 s: 3 heartbeats, 1 uploads, 1 stats reads, 3 rejected (400 x2, 404 x1)"
    )
    assert activity.take_line(10) is None


# --- simulator.py ----------------------------------------------------------------------------


def simulate(*args):
    """simulator.main for args, each as text: its exit status."""
    return simulator.main([str(arg) for arg in args])


def devices_file(tmp_path, *device_ids):
    return write(tmp_path / "devices.csv", "\n".join(["device_id", *device_ids]).encode())


def test_the_simulator_sends_the_day_and_prints_the_published_table(app, capsys):
    with waitress_server(app) as port:
        status = simulate("--url", f"http://127.0.0.1:{port}")
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split() for line in lines[1:-1]] == [[device_id, day.uptime, day.avg_upload_time, "PASS"]
                                                      for device_id, day in sorted(PUBLISHED_DAYS.items())]
    assert lines[-1] == "simulator: 2,910 requests sent, 0 failed; 5 of 5 published results match"


def test_the_simulator_drives_any_devices_file_and_one_device_stays_silent(tmp_path, capsys):
    devices = devices_file(tmp_path, *PUBLISHED_DAYS, "cam-1", "cam-2")
    with open_app(tmp_path / "fleet.db", devices) as app, waitress_server(app) as port:
        status = simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices)
    assert status == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows["cam-1"] == ["-", "-"]  # the first device not the vendor's sends nothing
    assert float(rows["cam-2"][0]) > 0


def test_simulated_days_are_repeatable_per_seed_and_make_a_varied_fleet():
    def uptime(day):
        minutes = {utc_minute(event.body["sent_at"]) for event in day if event.path.endswith("/heartbeat")}
        return uptime_percent(len(minutes), min(minutes), max(minutes))

    fleet = [simulated_day(f"cam-{number:03d}", seed=7) for number in range(100)]
    assert fleet == [simulated_day(f"cam-{number:03d}", seed=7) for number in range(100)]
    assert fleet != [simulated_day(f"cam-{number:03d}", seed=8) for number in range(100)]
    uptimes = sorted(uptime(day) for day in fleet)
    assert uptimes[0] < 90  # some flaky
    assert uptimes[50] > 99  # most steady
    assert all(len([event for event in day if event.path.endswith("/stats")]) == 100 for day in fleet)


def test_the_simulator_runs_as_a_script_on_the_standard_library_alone():
    # -S: no site-packages, so that importing fleetmon (and so Flask) or any other package fails.
    result = subprocess.run([sys.executable, "-S", str(HERE / "simulator.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: simulator.py [-h] [--url URL] [--devices CSV] [--seed SEED]")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pace", "-5"], "argument --pace: must be a number of seconds, 0 or more, not '-5'"),
        (["--pace", "nan"], "argument --pace: must be a number of seconds, 0 or more, not 'nan'"),
        (["--pace", "inf"], "argument --pace: must be a number of seconds, 0 or more, not 'inf'"),
        (["--live", "--every", "0"], "argument --every: must be a number of seconds, 0.01 or more, not '0'"),
        (["--url", "http://127.0.0.1:99999"],
         "argument --url: must be an http:// URL with a valid port, not 'http://127.0.0.1:99999'"),
        (["--url", "ftp://127.0.0.1"], "argument --url: must be an http:// URL with a valid port, not 'ftp://127.0.0.1'"),
        (["--url", "127.0.0.1:6733"], "argument --url: must be an http:// URL with a valid port, not '127.0.0.1:6733'"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--devices", "no-such.csv"], "cannot read devices file no-such.csv: No such file or directory"),
    ],
)
def test_the_simulator_refuses_what_it_cannot_use_in_one_line(capsys, args, message):
    assert simulate(*args) == 2
    assert capsys.readouterr() == ("", f"simulator: {message}\n")


@pytest.mark.parametrize(
    "content",
    [
        b"\xef\xbb\xbf device_id \n cam-2 \n\n\ncam-1\ncam-2\n",  # a byte-order mark, spaces, blank lines, a repeat
        b"name,device_id\nfirst,cam-1\nshort\nthird, cam-3 ,x\n",
        b"id\ncam-1\n",
        b"device_id\n\n , \n",
        b"",
        b"device_id\n\xff\n",
    ],
)
def test_the_simulator_reads_a_devices_file_as_fleetmon_does(tmp_path, content):
    path = write(tmp_path / "devices.csv", content)

    def outcome(read, error):
        try:
            return sorted(read(path))
        except error as raised:
            return str(raised)

    assert outcome(simulator.read_device_ids, simulator.SimulatorError) == outcome(load_device_ids, StartupError)


def test_the_simulator_without_fleetmon_is_one_line_and_exit_2(capsys):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    assert simulate("--url", url) == 2
    assert capsys.readouterr() == ("", f"simulator: nothing answers at {url} (connection refused); "
                                       "is fleetmon running?\n")


@pytest.mark.parametrize(("known", "unknown"), [(["cam-1", "cam-2"], 5), (sorted(PUBLISHED_DAYS)[:3], 2)])
def test_a_fleetmon_started_with_another_devices_file_is_told_and_sent_nothing(tmp_path, capsys, known, unknown):
    with open_app(tmp_path / "fleetmon.db", devices_file(tmp_path, *known)) as app, waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}") == 2
        assert stored(app, ("heartbeat_minutes", "uploads")) == {"heartbeat_minutes": [], "uploads": []}
    assert capsys.readouterr() == ("", f"simulator: fleetmon at http://127.0.0.1:{port} does not know {unknown} "
                                       f"of the 5 devices in {DEVICES_CSV} (started with another devices file?)\n")


@pytest.mark.parametrize("again", [False, True])
def test_a_fleetmon_that_holds_telemetry_already_is_told_before_anything_is_sent(app, client, capsys, again):
    """Sent again, a device's uploads count twice: the simulator refuses, unless --again,
    and then checks no published result of a device that had telemetry before."""
    send(client, heartbeat(minute_of_day(4)))
    with waitress_server(app) as port:
        before = stored(app)
        status = simulate("--url", f"http://127.0.0.1:{port}", *(["--again"] if again else []))
        after = stored(app)
    printed = capsys.readouterr()
    held = (f"simulator: fleetmon at http://127.0.0.1:{port} already holds telemetry "
            f"for 1 of the 5 devices in {DEVICES_CSV}")
    if not again:
        assert (status, printed.out, after) == (2, "", before)
        assert printed.err == (f"{held}: sent again, their uploads would count twice; "
                               "start fleetmon with a fresh --db, or give --again to send anyway\n")
    else:
        assert status == 0
        assert printed.err == f"{held}; sending again (--again), so their published results cannot be checked\n"
        lines = printed.out.splitlines()
        assert lines[-1] == ("simulator: 2,910 requests sent, 0 failed; 4 of 4 published results match; "
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
    gives: bytes (b"" closes the connection unanswered), an iterable of bytes, None (no
    answer, ever), or STOP. A thread for each connection; leaving stops it, joining all."""

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
                for chunk in [answer] if isinstance(answer, bytes) else answer or []:
                    connection.sendall(chunk)


FIRST_STATS = f"/api/v1/devices/{min(PUBLISHED_DAYS)}/stats"  # the first the simulator reads


@pytest.mark.parametrize(
    ("garbled", "answer", "problem"),
    [
        ("/", lambda: b"SSH-2.0-OpenSSH_9.6\r\n", "answered GET / with something that is not HTTP"),
        ("/", lambda: itertools.chain([b"HTTP/1.1 200 OK\r\n\r\n"], itertools.repeat(b"{" * 4096)),
         "answered GET / with a body of more than 64 KiB"),
        ("/", lambda: b"", "closed the connection twice without answering GET /"),
        ("/", lambda: http_answer(200, b'{"name": "something else"}'), "answers, but not as fleetmon (HTTP 200)"),
        (FIRST_STATS, lambda: http_answer(500, b"{}"), f"answered GET {FIRST_STATS} with HTTP 500"),
        (FIRST_STATS, lambda: http_answer(200, b"<p>stats</p>"),
         f"answered GET {FIRST_STATS} with a body that is not a device's stats"),
        (FIRST_STATS, lambda: http_answer(200, b"[" * 60_000),
         f"answered GET {FIRST_STATS} with a body that is not a device's stats"),
        (FIRST_STATS, lambda: http_answer(200, b'{"uptime": "high", "avg_upload_time": "3s"}'),
         f"answered GET {FIRST_STATS} with a body that is not a device's stats"),
    ],
)
def test_a_server_answering_garbage_is_told_in_one_line(capsys, garbled, answer, problem):
    with FakeServer(lambda method, path: answer() if path == garbled else fleetmon_answer(method, path)) as server:
        assert simulate("--url", server.url) == 2
    assert capsys.readouterr() == ("", f"simulator: {server.url} {problem}\n")


def test_a_server_that_never_answers_is_given_up_on_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(simulator, "ANSWER_TIMEOUT_SECONDS", 0.2)
    with FakeServer(lambda method, path: None) as server:
        assert simulate("--url", server.url) == 2
    assert capsys.readouterr() == ("", f"simulator: {server.url} did not answer GET / within 0.2 s\n")


def test_when_fleetmon_stops_the_simulator_stops_at_the_refused_connection(tmp_path, capsys):
    """fleetmon stopping stops listening and drops its connections: the next request is
    refused, and the simulator stops there, rather than count the rest of its day failed."""
    day = simulated_day(DEVICE)
    assert day[10].path.endswith("/heartbeat")  # sent again, on a fresh connection: refused
    posts = itertools.count(1)

    def answer(method, path):
        return STOP if method == "POST" and next(posts) > 10 else fleetmon_answer(method, path)

    with FakeServer(answer) as server:
        assert simulate("--url", server.url, "--devices", devices_file(tmp_path, DEVICE)) == 2
    assert capsys.readouterr() == ("", f"simulator: fleetmon at {server.url} stopped answering (connection refused) "
                                       f"after 10 of {len(day)} requests\n")


def test_when_fleetmon_stops_every_client_stops(capsys):
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
        (True, "\rsimulator: 10 of 100 requests sent, 0 failed, 20 requests/s"
               "\rsimulator: 60 of 100 requests sent, 1 failed, 6 requests/s"
               "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s"
               "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s\n"),
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
        return [utc_second(sent_at) for path, sent_at in sent if path == [device_id, endpoint]]

    assert seconds("cam-1", "heartbeat") == list(range(0, 125, 10))
    assert seconds("cam-2", "heartbeat") == [5, 15, 95, 105, 115]
    assert seconds("cam-1", "stats") == [0, 60, 120]  # an upload with every sixth heartbeat
    assert seconds("cam-2", "stats") == [5]
    assert sent[0] == (["cam-1", "heartbeat"], "2025-03-01T12:00:00.000000Z")


def utc_second(sent_at):
    """Seconds from 2025-03-01T12:00:00Z, for the live tests."""
    return round((datetime.fromisoformat(sent_at) - datetime(2025, 3, 1, 12, 0, tzinfo=UTC)).total_seconds())


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
        status = simulate("--url", f"http://127.0.0.1:{port}", "--live", "--every", "0.2")
    minutes_now = range(first_minute, int(time.time() // 60) + 1)
    printed = capsys.readouterr()
    assert (status, printed.err) == (0, "")
    first, last = printed.out.splitlines()
    assert first == (f"simulator: live to http://127.0.0.1:{port}, a heartbeat every 0.2 s from each of 5 devices; "
                     "Ctrl+C stops")
    assert re.fullmatch(r"simulator: stopped; \d+ requests sent, 0 failed", last)
    rows = stored(app, ("heartbeat_minutes", "uploads"))
    assert {minute for _, minute in rows["heartbeat_minutes"]} <= set(minutes_now)  # stamped with the time
    assert {device_id for device_id, _ in rows["heartbeat_minutes"]} == set(PUBLISHED_DAYS)
    assert {upload[1] for upload in rows["uploads"]} == set(PUBLISHED_DAYS)


# --- The fleet page ----------------------------------------------------------------------------

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}  # as browsers send


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
    return [html.unescape(device_id) for device_id in re.findall(r'<th scope="row"><a href="[^"]*" title="([^"]*)"', page)]


def test_the_fleet_page_lists_the_worst_uptime_first_and_silent_devices_last(client):
    worst, middle, best = "26-9a-66-01-33-83", "18-b8-87-e7-1f-06", "b4-45-52-a2-f1-3c"
    for device_id, minutes in ((best, range(11)), (middle, [0, 5, 10]), (worst, [0, 10])):
        for minute in minutes:
            send(client, heartbeat(minute_of_day(minute), device_id))
    send(client, upload(1_500, device_id=best))
    page = fleet_page(client)
    assert listed_ids(page) == [worst, middle, best, "38-4e-73-e0-33-59", "60-6b-44-84-dc-64"]
    assert page.count('<span class="badge">silent</span>') == 2
    assert "<dt>Reporting</dt><dd>3</dd>" in page
    assert "<dt>Silent</dt><dd>2</dd>" in page
    assert "<dt>Median uptime</dt><dd>30.000%</dd>" in page  # of 20 %, 30 % and 100 %
    assert "<dt>Mean upload time</dt><dd>1.5µs</dd>" in page
    assert '<time datetime="2024-01-01T10:10:00Z">2024-01-01 10:10</time>' in page  # the newest heartbeat


def test_the_online_strip_shows_each_gap_with_its_time_range(client):
    for minute in (0, 1, 2, 5, 6, 10):
        send(client, heartbeat(minute_of_day(minute)))
    page = fleet_page(client)
    assert 'aria-label="6 of 11 minutes online, 2 gaps"' in page
    assert re.findall(r'class="off" style="flex-grow: (\d+)" title="([^"]*)"', page) == [
        ("2", "missed 2024-01-01 10:03–10:04 UTC (2 min)"),
        ("3", "missed 2024-01-01 10:07–10:09 UTC (3 min)"),
    ]


def test_the_online_strip_covers_the_last_24_hours_at_most(client):
    for minute in (0, 1, 3_000, 3_001):
        send(client, heartbeat(minute_of_day(minute)))
    page = fleet_page(client)
    assert 'aria-label="2 of 1440 minutes online, 1 gap"' in page


def test_the_fleet_page_of_a_fleet_that_sent_nothing(client):
    page = fleet_page(client)
    assert page.count('<span class="badge">silent</span>') == 5
    assert "<dt>Reporting</dt><dd>0</dd>" in page
    assert "<dt>Median uptime</dt><dd>—</dd>" in page


def test_device_ids_are_escaped_everywhere_on_the_fleet_page(tmp_path):
    hostile = ['<img src=x onerror=alert(1)>', '" onmouseover="alert(2)', "'><b>bold"]
    devices = write(tmp_path / "devices.csv", "\n".join(["device_id", *(f'"{d.replace(chr(34), 2 * chr(34))}"' for d in hostile)]).encode())
    with open_app(tmp_path / "fleet.db", devices) as app:
        client = app.test_client()
        for device_id in hostile:
            send(client, heartbeat("2024-01-01T10:00:00Z", urllib.parse.quote(device_id, safe="")))
        page = fleet_page(client)
        assert listed_ids(fleet_page(client, "?q=onerror")) == hostile[:1]
    assert "<img" not in page and "<b>" not in page and 'onmouseover="' not in page
    assert sorted(listed_ids(page)) == sorted(hostile)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_fleet_page_comes_100_rows_a_page_and_filters_by_id(tmp_path):
    devices = write(tmp_path / "devices.csv", "\n".join(["device_id", *(f"cam-{n:03d}" for n in range(250))]).encode())
    with open_app(tmp_path / "fleet.db", devices) as app:
        client = app.test_client()
        pages = [fleet_page(client, f"?page={number}") for number in (1, 2, 3)]
        assert [len(listed_ids(page)) for page in pages] == [100, 100, 50]
        assert listed_ids(pages[2])[-1] == "cam-249"
        assert '<a href="/?page=2" rel="next">' in pages[0] and "Page 1 of 3" in pages[0]
        assert '<a href="/?page=2" rel="prev">' in pages[2]
        filtered = fleet_page(client, "?q=CAM-02")
        assert listed_ids(filtered) == [f"cam-{n:03d}" for n in range(20, 30)]
        assert "10 devices match" in filtered
        assert listed_ids(fleet_page(client, "?q=nothing-like-it")) == []
        assert listed_ids(fleet_page(client, "?page=9")) == listed_ids(pages[2])  # past the end: the last
        assert client.get("/?page=0", headers=HTML).status_code == 400


# --- The fleet page in a real browser ------------------------------------------------------------

# A minimal Chrome DevTools Protocol driver, standard library only: checking the page needs
# a real browser (layout, the script, the requests it makes) but not Selenium, Playwright or
# a websocket library. Chromium's --remote-debugging-pipe speaks CDP as JSON messages ended
# by a NUL byte, reading them on its fd 3 and writing them on its fd 4. POSIX only.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


class CDPError(RuntimeError):
    """The browser answered with an error, went away, or did not answer in time."""


class Chromium:
    """One headless Chromium with one page attached. Use it as a context manager: leaving
    it closes the browser, the pipes and the temporary profile."""

    def __init__(self, binary, width=1280, height=900, timeout=20.0):
        self.binary, self.width, self.height, self.timeout = binary, width, height, timeout
        self.requests: list[str] = []  # every URL the page asked for, in order
        self.errors: list[str] = []  # every uncaught JavaScript exception in the page
        self.profile = None  # the temporary --user-data-dir, while the browser runs
        self._messages: queue.Queue = queue.Queue()  # filled by the reader thread
        self._next_id, self._session, self._loaded = 0, None, False
        self._process = self._reader = self._to_browser = self._from_browser = None

    def __enter__(self):
        self._profile_dir = tempfile.TemporaryDirectory(prefix="cdp-profile-")
        self.profile = self._profile_dir.name
        try:
            self._launch()
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
            self._session = attached["sessionId"]  # from now on, commands go to the page
            self.call("Page.enable")  # for Page.loadEventFired
            self.call("Network.enable")  # for Network.requestWillBeSent
            self.call("Runtime.enable")  # for Runtime.exceptionThrown
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _launch(self):
        import fcntl  # POSIX only, as this test is

        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Popen keeps passed fds at their own numbers and Chromium wants exactly 3 and 4:
        # move the child's ends to 10 and up, and let bash renumber them as it execs Chromium.
        child_in = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)
        script = f'exec "$0" "$@" 3<&{child_in} 4>&{child_out} {child_in}<&- {child_out}>&-'
        argv = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}"]
        try:
            with open(os.path.join(self.profile, "stderr.log"), "wb") as log:
                self._process = subprocess.Popen(
                    ["/bin/bash", "-c", script, *argv], pass_fds=(child_in, child_out),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                    start_new_session=True)  # its own process group, for close() to kill
        finally:  # the child has its own copies; ours would keep the pipes open forever
            os.close(child_in)
            os.close(child_out)
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()

    def _read(self):
        """Reader thread: split the browser's output into messages; None marks its end.
        A thread, so that every wait elsewhere can be a queue.get with a timeout."""
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            *messages, buffer = (buffer + chunk).split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _stderr_tail(self, size=400):
        with open(os.path.join(self.profile, "stderr.log"), "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - size))
            return log.read().decode(errors="replace").strip()

    def _receive(self, deadline, waiting_for):
        """The next message, noting the events we track; CDPError at the deadline."""
        try:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise CDPError(f"Chromium sent nothing in time while waiting for {waiting_for}") from None
        if message is None:
            self._messages.put(None)  # so that any later wait fails at once too
            raise CDPError(f"Chromium closed its pipe while waiting for {waiting_for}; "
                           f"its stderr ends: {self._stderr_tail()!r}")
        if message.get("sessionId") == self._session and "method" in message:
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            elif message["method"] == "Page.loadEventFired":
                self._loaded = True
            elif message["method"] == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details["text"])
        return message

    def call(self, method, params=None, timeout=None):
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session:
            message["sessionId"] = self._session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:  # a blocking pipe write can still be partial
                data = data[os.write(self._to_browser, data):]
        except BrokenPipeError:
            raise CDPError(f"Chromium is gone (sending {method}); "
                           f"its stderr ends: {self._stderr_tail()!r}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while (answer := self._receive(deadline, method)).get("id") != self._next_id:
            pass  # events, already noted by _receive
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error'].get('message')}")
        return answer["result"]

    def navigate(self, url):
        """Go to url and return once its load event has fired."""
        self._loaded = False
        error = self.call("Page.navigate", {"url": url}).get("errorText")
        if error:
            raise CDPError(f"navigating to {url}: {error}")
        deadline = time.monotonic() + self.timeout
        while not self._loaded:
            self._receive(deadline, f"the load event of {url}")

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page, awaited if it is a promise."""
        result = self.call("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            thrown = details.get("exception", {}).get("description") or details["text"]
            raise CDPError(f"{expression!r} threw {thrown}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=None, interval=0.1):
        """Poll expression until its value is truthy in Python, and return it; CDPError after
        timeout s. Values travel as JSON, so a DOM node arrives as {}: test it with !!."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise CDPError(f"{expression!r} still falsy after {timeout} s")
            time.sleep(interval)
        return value

    def screenshot(self, path, width=None):
        """Save a PNG of the whole page laid out width CSS pixels wide (as a phone below 600).
        The width stays in force afterwards, as a resized window would."""
        width = width or self.width
        self.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": self.height, "deviceScaleFactor": 1, "mobile": width < 600})
        height = self.evaluate("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        shot = self.call("Page.captureScreenshot",
                         {"format": "png", "clip": clip, "captureBeyondViewport": True})
        with open(path, "wb") as file:
            file.write(base64.b64decode(shot["data"]))

    def close(self):
        """Close the browser, then the pipes, then the profile. Safe to call twice."""
        if self._process and self._process.poll() is None:
            self._session = None  # Browser.close goes to the browser, not the page
            deadline = time.monotonic() + 5
            with suppress(CDPError, OSError):  # it may exit before it answers
                self.call("Browser.close", timeout=5)
            try:
                self._process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # hung: kill it and its helpers, which would
                os.killpg(self._process.pid, signal.SIGKILL)  # go on writing to the profile
                self._process.wait()
        if self._to_browser is not None:
            os.close(self._to_browser)
            self._to_browser = None
        if self._reader:
            self._reader.join(timeout=5)  # it ends at EOF, once the browser has exited
        if self._from_browser is not None and not (self._reader and self._reader.is_alive()):
            os.close(self._from_browser)  # never under a thread that may still read it
            self._from_browser = None
        if self.profile:
            self._profile_dir.cleanup()
            self.profile = None


CHROMIUM = shutil.which("chromium")


@pytest.fixture
def chromium():
    if CHROMIUM is None or sys.platform == "win32":
        reason = "the browser test needs Debian's chromium (apt-get install -y chromium) on Linux"
        warnings.warn(reason, stacklevel=1)  # so that the reason shows in pytest's summary
        pytest.skip(reason)
    with Chromium(CHROMIUM) as browser:
        yield browser


def test_the_fleet_page_fills_in_live_in_a_browser(app, chromium, tmp_path, capsys):
    with waitress_server(app) as port:
        url = f"http://127.0.0.1:{port}/"
        chromium.navigate(url)
        assert chromium.evaluate("document.querySelectorAll('#fleet .badge').length") == 5  # all silent
        chromium.evaluate("window.loadedOnce = true")  # gone if the page reloads
        simulation = threading.Thread(target=simulator.main, args=(["--url", url, "--pace", "3"],))
        simulation.start()
        try:
            chromium.wait_for("document.querySelectorAll('#fleet .strip[role=group]').length === 5", timeout=60)
        finally:
            simulation.join()
        # The last refresh after the simulated day: every device with its 100 uploads.
        uploads = "[...document.querySelectorAll('#fleet tbody tr td:nth-child(5)')].map(td => td.textContent)"
        chromium.wait_for(f"JSON.stringify({uploads}) === JSON.stringify(Array(5).fill('100'))", timeout=10)
        rows = chromium.evaluate("[...document.querySelectorAll('#fleet tbody th')].map(th => th.textContent.trim())")
        assert chromium.evaluate("window.loadedOnce") is True
        chromium.screenshot(tmp_path / "fleet-page.png")
    assert rows == ["26-9a-66-01-33-83", "18-b8-87-e7-1f-06", "38-4e-73-e0-33-59", "60-6b-44-84-dc-64", "b4-45-52-a2-f1-3c"]
    assert chromium.errors == []
    assert {urllib.parse.urlsplit(request).netloc for request in chromium.requests} == {f"127.0.0.1:{port}"}
    assert "5 of 5 published results match" in capsys.readouterr().out


@given(online=st.integers(0, 10**6), first=st.integers(-10**9, 10**9), span=st.integers(0, 10**6))
def test_uptime_sql_is_uptime_percent_to_the_last_bit(online, first, span):
    """The fleet page orders and summarises by fleetmon.UPTIME_SQL, uptime_percent's twin."""
    last = first + span if online else None
    first = first if online else None
    with closing(sqlite3.connect(":memory:")) as db:
        in_sql = db.execute(
            f"SELECT {fleetmon.UPTIME_SQL} FROM (SELECT ? AS online_minutes, ? AS first_minute, ? AS last_minute)",
            (online, first, last),
        ).fetchone()[0]
    assert in_sql == uptime_percent(online, first, last)
