"""fleetmon's tests: the pure maths, every answer of the HTTP API, storage, and a real
waitress server under concurrent load and kill -9.

Run with ``python -m pytest``. ``FLEETMON_BENCHMARK=1 python -m pytest -k benchmark -s``
runs the benchmark instead (see README.md, "Performance and limits").
"""

import http.client
import json
import os
import re
import random
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import openapi_spec_validator
import pytest
import schemathesis
import waitress
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fleetmon
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

HERE = Path(__file__).resolve().parent
DEVICE = "60-6b-44-84-dc-64"
OTHER_DEVICE = "b4-45-52-a2-f1-3c"

# What the device simulator publishes for a day of telemetry: heartbeats sent over a
# 480-minute span, then uptime as it prints it and the mean upload time it compares.
SIMULATOR_DAY = {
    "60-6b-44-84-dc-64": (479, "99.79167", "3m7.893379134s"),
    "b4-45-52-a2-f1-3c": (480, "100.00000", "3m19.085533836s"),
    "26-9a-66-01-33-83": (446, "92.91667", "3m21.858747766s"),
    "18-b8-87-e7-1f-06": (474, "98.75000", "3m17.331667813s"),
    "38-4e-73-e0-33-59": (479, "99.79167", "3m29.226522788s"),
}
SIMULATOR_START = datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc)


# --- Fixtures and helpers -----------------------------------------------------------


@pytest.fixture
def app(tmp_path):
    app = create_app(database=tmp_path / "fleetmon.db", devices_csv=HERE / "devices.csv")
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def heartbeat_url(device_id=DEVICE):
    return f"/api/v1/devices/{device_id}/heartbeat"


def stats_url(device_id=DEVICE):
    return f"/api/v1/devices/{device_id}/stats"


def stored(app, tables=("heartbeat_minutes", "uploads", "device_stats")):
    """What the database holds, to show that a rejected request changed nothing."""
    with sqlite3.connect(app.config["DATABASE"]) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables}


def rfc3339(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def simulator_day(device_id):
    """(path, body) requests that give the published stats for one device.

    Heartbeats: the first and last minute of the 480-minute span and as many in
    between as the simulator reports. Uploads: 100 around the published mean whose
    total is 37 ns over 100 means, so only truncating division gives that mean.
    """
    heartbeats, _, mean_text = SIMULATOR_DAY[device_id]
    missing = set(random.Random(device_id).sample(range(1, 480), 481 - heartbeats))
    minutes = [m for m in range(481) if m not in missing]
    mean = parse_go_duration(mean_text)
    uploads = [mean + sign * step * 7_919_113 for step in range(50) for sign in (1, -1)]
    uploads[0] += 37
    requests = [
        (heartbeat_url(device_id), {"sent_at": rfc3339(SIMULATOR_START + timedelta(minutes=m, seconds=17))})
        for m in minutes
    ] + [
        (stats_url(device_id), {"sent_at": rfc3339(SIMULATOR_START + timedelta(minutes=4 * i)), "upload_time": ns})
        for i, ns in enumerate(uploads)
    ]
    random.Random(device_id).shuffle(requests)  # arrival order must not matter
    return requests


def parse_go_duration(text):
    """'3m7.893379134s' -> nanoseconds; enough of Go's syntax for the table above."""
    minutes, seconds = text.rstrip("s").split("m")
    whole, fraction = seconds.split(".")
    return (int(minutes) * 60 + int(whole)) * 10**9 + int(fraction.ljust(9, "0"))


@contextmanager
def waitress_server(app, threads=4):
    """A real waitress server for app on a free loopback port, in this process."""
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=threads)
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    try:
        yield server.effective_port
    finally:
        server.close()
        server.task_dispatcher.shutdown()
        runner.join(timeout=10)


@contextmanager
def server_process(*args):
    """Run Python with args as a server that prints where it listens.

    Yields the process, its port, and what it printed up to then.
    """
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        printed = []
        while not printed or "listening on" not in printed[-1]:
            printed.append(process.stdout.readline())
            assert printed[-1], f"the server stopped before listening: {printed}"
        yield process, int(re.search(r"http://127\.0\.0\.1:(\d+)", printed[-1]).group(1)), printed
    finally:
        process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean shutdown
        process.wait()
        process.stdout.close()


def http_request(connection, method, path, body=None):
    payload = None if body is None else json.dumps(body)
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


# --- Maths: Go's time.Duration.String() ----------------------------------------------

# Each right-hand side is what Go prints for time.Duration(left).String() (checked
# against go1.19).
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
    (187_893_379_134, "3m7.893379134s"),
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


# --- Maths: uptime ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("online", "first", "last", "uptime"),
    [
        (0, None, None, 0.0),  # uploads only
        (1, 1000, 1000, 100.0),  # one online minute
        (479, 0, 480, 479 / 480 * 100),  # the span is exclusive: not 479 / 481
        (446, 0, 480, 446 / 480 * 100),
        (480, 0, 480, 100.0),
        (481, 0, 480, 100.0),  # online in every minute of the span: capped
        (2, 5, 6, 100.0),
        (2, -10, 50, 2 / 60 * 100),  # minutes before 1970 are fine
    ],
)
def test_uptime_percent(online, first, last, uptime):
    assert uptime_percent(online, first, last) == uptime


def test_uptime_is_not_rounded():
    assert uptime_percent(479, 0, 480) == 99.79166666666667
    assert f"{uptime_percent(479, 0, 480):.5f}" == "99.79167"


# --- Maths: sent_at --------------------------------------------------------------------


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
    assert app.config["DEVICE_IDS"] == set(SIMULATOR_DAY)


def test_load_device_ids_tolerates_what_spreadsheets_write(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_bytes(b"\xef\xbb\xbf name , device_id \r\nA, aa-01 \r\n\r\nB,bb-02\r\nC,aa-01\r\nD,\r\nE\r\n")
    assert load_device_ids(path) == {"aa-01", "bb-02"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read devices file"),
        (b"", "has no device_id column"),
        (b"id\n60-6b-44-84-dc-64\n", "has no device_id column"),
        (b"device_id\n\xff\xfe\n", "is not UTF-8 text"),
    ],
)
def test_load_device_ids_refuses_a_missing_or_wrong_file(tmp_path, content, message):
    path = tmp_path / "devices.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StartupError, match=message):
        load_device_ids(path)


def test_a_bad_devices_file_stops_the_start_with_one_line(tmp_path):
    missing = tmp_path / "nowhere.csv"
    run = subprocess.run(
        [sys.executable, str(HERE / "fleetmon.py"), "--devices", str(missing), "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr == f"fleetmon: cannot read devices file {missing}: No such file or directory\n"
    assert run.stdout == ""


# --- HTTP: the three contract endpoints ------------------------------------------------


def test_heartbeat_is_stored_and_answered_with_an_empty_204(app, client):
    response = client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:04:31+02:00"})
    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert stored(app)["heartbeat_minutes"] == [(DEVICE, utc_minute("2024-01-01T08:04:00Z"))]


def test_upload_is_stored_as_sent(app, client):
    body = {"sent_at": "2024-01-01T10:04:00.123456789-05:00", "upload_time": 187_893_379_134}
    response = client.post(stats_url(), json=body)
    assert response.status_code == 204
    assert response.data == b""
    assert stored(app)["uploads"] == [(1, DEVICE, "2024-01-01T10:04:00.123456789-05:00", 187_893_379_134)]


def test_stats_are_204_until_a_device_sends_something(client):
    response = client.get(stats_url())
    assert response.status_code == 204
    assert response.data == b""


def test_stats_after_heartbeats_and_uploads(client):
    for minute in ("10:00", "10:01", "10:01", "10:03", "10:04"):
        assert client.post(heartbeat_url(), json={"sent_at": f"2024-01-01T{minute}:00Z"}).status_code == 204
    for upload_time in (1_000, 2_001):
        body = {"sent_at": "2024-01-01T10:02:00Z", "upload_time": upload_time}
        assert client.post(stats_url(), json=body).status_code == 204
    response = client.get(stats_url())
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert response.get_json() == {"uptime": 100.0, "avg_upload_time": "1.5µs"}


def test_uptime_is_a_full_precision_json_number(client):
    for minute in [m for m in range(481) if m not in (100, 200)]:  # 479 online, 480-minute span
        sent_at = rfc3339(SIMULATOR_START + timedelta(minutes=minute))
        client.post(heartbeat_url(), json={"sent_at": sent_at})
    assert b'"uptime":99.79166666666667' in client.get(stats_url()).data


def test_retried_heartbeats_in_one_minute_count_once(app, client):
    for sent_at in ("2024-01-01T10:00:00Z", "2024-01-01T10:00:59.999Z", "2024-01-01T11:00:30+01:00",
                    "2024-01-01T10:10:00Z", "2024-01-01T10:10:00Z"):
        assert client.post(heartbeat_url(), json={"sent_at": sent_at}).status_code == 204
    assert client.get(stats_url()).get_json()["uptime"] == 2 / 10 * 100
    assert len(stored(app)["heartbeat_minutes"]) == 2


def test_arrival_order_does_not_matter(tmp_path):
    minutes = [0, 3, 4, 9, 10, 30]
    answers = []
    for order in (minutes, minutes[::-1], [9, 0, 30, 4, 10, 3]):
        app = create_app(database=tmp_path / f"{order}.db", devices_csv=HERE / "devices.csv")
        client = app.test_client()
        for minute in order:
            client.post(heartbeat_url(), json={"sent_at": rfc3339(SIMULATOR_START + timedelta(minutes=minute))})
        answers.append(client.get(stats_url()).get_json())
    assert answers == [{"uptime": 6 / 30 * 100, "avg_upload_time": "0s"}] * 3


def test_upload_sent_at_is_no_heartbeat(client):
    client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:00:00Z"})
    client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:04:00Z"})
    client.post(stats_url(), json={"sent_at": "2024-01-01T12:00:00Z", "upload_time": 60_000_000_000})
    client.post(stats_url(), json={"sent_at": "2024-01-01T10:02:00Z", "upload_time": 0})
    assert client.get(stats_url()).get_json() == {"uptime": 2 / 4 * 100, "avg_upload_time": "30s"}


def test_uploads_only_give_zero_uptime(client):
    client.post(stats_url(), json={"sent_at": "2024-01-01T10:00:00Z", "upload_time": 3_723_000_000_001})
    assert client.get(stats_url()).get_json() == {"uptime": 0.0, "avg_upload_time": "1h2m3.000000001s"}


def test_heartbeats_only_give_0s_average(client):
    client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:00:00Z"})
    assert client.get(stats_url()).get_json() == {"uptime": 100.0, "avg_upload_time": "0s"}


def test_devices_are_kept_apart(client):
    client.post(stats_url(), json={"sent_at": "2024-01-01T10:00:00Z", "upload_time": 5})
    assert client.get(stats_url(OTHER_DEVICE)).status_code == 204


def test_body_is_json_whatever_the_content_type(client):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = client.post(heartbeat_url(), data='{"sent_at": "2024-01-01T10:04:00Z"}', headers=headers)
        assert response.status_code == 204


def test_unknown_fields_are_ignored(client):
    body = {"sent_at": "2024-01-01T10:04:00Z", "upload_time": 7, "firmware": {"v": [1, 2]}}
    assert client.post(stats_url(), json=body).status_code == 204
    assert client.get(stats_url()).get_json()["avg_upload_time"] == "7ns"


# --- HTTP: errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "url"), [("POST", heartbeat_url), ("POST", stats_url), ("GET", stats_url)])
@pytest.mark.parametrize("device_id", ["unknown", "60-6b-44-84-dc-6", "60-6B-44-84-DC-64", " 60-6b-44-84-dc-64"])
def test_unknown_device_is_404_whatever_the_body(client, method, url, device_id):
    response = client.open(url(device_id), method=method, data=b"not json at all")
    assert response.status_code == 404
    assert response.get_json() == {"msg": "device not found"}


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/api/v1/devices/60-6b-44-84-dc-64/heartbeat", "get", "OPTIONS, POST"),
        ("/api/v1/devices/60-6b-44-84-dc-64/heartbeat", "put", "OPTIONS, POST"),
        ("/api/v1/devices/unknown/heartbeat", "delete", "OPTIONS, POST"),  # 405 before 404
        ("/api/v1/devices/60-6b-44-84-dc-64/stats", "patch", "GET, HEAD, OPTIONS, POST"),
        ("/openapi.json", "post", "GET, HEAD, OPTIONS"),
    ],
)
def test_wrong_method_is_405_with_allow(client, path, method, allow):
    response = getattr(client, method)(path, data=b"not json")
    assert response.status_code == 405
    assert response.get_json() == {"msg": "The method is not allowed for the requested URL."}
    assert sorted(response.headers["Allow"].split(", ")) == allow.split(", ")


@pytest.mark.parametrize(
    "path",
    ["/api/v1/devices", "/api/v1/devices/60-6b-44-84-dc-64", "/api/v1/devices/60-6b/44-84-dc-64/stats",
     "/api/v2/x", "/favicon.ico"],
)
def test_unknown_path_is_404_json(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.content_type == "application/json"
    assert "msg" in response.get_json()


BAD_BODIES = [
    (b"", "body is not valid JSON"),
    (b"{", "body is not valid JSON"),
    (b"sent_at=2024-01-01T10:04:00Z", "body is not valid JSON"),
    (b'{"sent_at": "2024-01-01T10:04:00Z", "x": NaN}', "body is not valid JSON"),
    (b'{"sent_at": "2024-01-01T10:04:00Z"} {}', "body is not valid JSON"),
    (b"\xff\xfe{}", "body is not valid JSON"),
    (b"[" * 60_000, "body is not valid JSON"),
    (b"null", "body must be a JSON object"),
    (b"[]", "body must be a JSON object"),
    (b'"2024-01-01T10:04:00Z"', "body must be a JSON object"),
    (b"{}", "sent_at is required"),
    (b'{"sent_At": "2024-01-01T10:04:00Z"}', "sent_at is required"),
]
SENT_AT_MESSAGE = "sent_at must be an RFC 3339 date-time with an offset, like 2024-01-01T10:04:00Z"
BAD_SENT_AT = [None, 1704103440, True, ["2024-01-01T10:04:00Z"], "2024-01-01T10:04:00", "2024-01-01", "yesterday"]


@pytest.mark.parametrize("path", [heartbeat_url(), stats_url()])
@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_body_is_400_and_stores_nothing(app, client, path, body, message):
    before = stored(app)
    response = client.post(path, data=body)
    assert response.status_code == 400
    assert response.get_json() == {"msg": message}
    assert stored(app) == before


@pytest.mark.parametrize("path", [heartbeat_url(), stats_url()])
@pytest.mark.parametrize("sent_at", BAD_SENT_AT)
def test_bad_sent_at_is_400_and_stores_nothing(app, client, path, sent_at):
    before = stored(app)
    response = client.post(path, json={"sent_at": sent_at, "upload_time": 1})
    assert response.status_code == 400
    assert response.get_json() == {"msg": SENT_AT_MESSAGE}
    assert stored(app) == before


@pytest.mark.parametrize(
    "upload_time", [True, False, 5.0, 1e3, "5", None, -1, INT64_MAX + 1, 10**400, [5], {}]
)
def test_bad_upload_time_is_400_and_stores_nothing(app, client, upload_time):
    before = stored(app)
    response = client.post(stats_url(), json={"sent_at": "2024-01-01T10:04:00Z", "upload_time": upload_time})
    assert response.status_code == 400
    assert response.get_json() == {
        "msg": "upload_time must be an integer number of nanoseconds from 0 to 9223372036854775807"
    }
    assert stored(app) == before


def test_missing_upload_time_is_400_and_stores_nothing(app, client):
    before = stored(app)
    response = client.post(stats_url(), json={"sent_at": "2024-01-01T10:04:00Z"})
    assert response.status_code == 400
    assert response.get_json() == {"msg": "upload_time is required"}
    assert stored(app) == before


def test_upload_time_limits_are_accepted(client):
    assert client.post(stats_url(DEVICE), json={"sent_at": "2024-01-01T10:04:00Z", "upload_time": 0}).status_code == 204
    body = {"sent_at": "2024-01-01T10:04:00Z", "upload_time": INT64_MAX}
    assert client.post(stats_url(OTHER_DEVICE), json=body).status_code == 204
    assert client.get(stats_url(DEVICE)).get_json()["avg_upload_time"] == "0s"
    assert client.get(stats_url(OTHER_DEVICE)).get_json()["avg_upload_time"] == "2562047h47m16.854775807s"


def test_an_upload_that_would_overflow_the_total_is_409_and_stores_nothing(app, client):
    body = {"sent_at": "2024-01-01T10:04:00Z", "upload_time": INT64_MAX - 1}
    assert client.post(stats_url(), json=body).status_code == 204
    before = stored(app)
    response = client.post(stats_url(), json={"sent_at": "2024-01-01T10:05:00Z", "upload_time": 2})
    assert response.status_code == 409
    assert response.get_json() == {
        "msg": "this upload_time would overflow the device's total upload time "
               "(9223372036854775807 ns); nothing was stored"
    }
    assert stored(app) == before
    assert client.post(stats_url(), json={"sent_at": "2024-01-01T10:05:00Z", "upload_time": 1}).status_code == 204
    assert client.get(stats_url()).get_json()["avg_upload_time"] == format_duration(INT64_MAX // 2)


@pytest.mark.parametrize("path", [heartbeat_url(), stats_url()])
def test_body_limit_is_64_kib(app, client, path):
    def body_of_size(size):
        prefix = b'{"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1, "padding": "'
        return prefix + b"x" * (size - len(prefix) - 2) + b'"}'

    assert client.post(path, data=body_of_size(64 * 1024)).status_code == 204
    before = stored(app)
    response = client.post(path, data=body_of_size(64 * 1024 + 1))
    assert response.status_code == 413
    assert response.get_json() == {"msg": "The data value transmitted exceeds the capacity limit."}
    assert stored(app) == before


def test_unexpected_error_is_500_json_without_details_and_stores_nothing(app, client, caplog):
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as in production, not raise into the test
    with sqlite3.connect(app.config["DATABASE"]) as db:
        db.execute("DROP TABLE uploads")
    before = stored(app, ("heartbeat_minutes", "device_stats"))
    response = client.post(stats_url(), json={"sent_at": "2024-01-01T10:04:00Z", "upload_time": 5})
    assert response.status_code == 500
    assert response.content_type == "application/json"
    assert response.get_json() == {
        "msg": "The server encountered an internal error and was unable to complete your request. "
               "Either the server is overloaded or there is an error in the application."
    }
    assert stored(app, ("heartbeat_minutes", "device_stats")) == before
    assert "no such table: uploads" in caplog.text  # the detail goes to the log


@pytest.mark.parametrize(
    "device_id",
    ["'; DROP TABLE device_stats; --", "60-6b-44-84-dc-64' OR '1'='1", "%", "_" * 17, "x" * 5_000, "é", "\x00"],
)
def test_hostile_device_ids_are_404(app, client, device_id):
    before = stored(app)
    for path in (heartbeat_url(device_id), stats_url(device_id)):
        response = client.post(path, json={"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1})
        assert response.status_code == 404
        assert response.get_json()["msg"]
    assert stored(app) == before


# --- Storage ----------------------------------------------------------------------------


def test_schema_can_be_applied_again_and_a_restart_gives_the_same_stats(app, client, tmp_path):
    for path, body in simulator_day(DEVICE)[:300]:
        assert client.post(path, json=body).status_code == 204
    answer = client.get(stats_url()).get_json()
    restarted = create_app(database=app.config["DATABASE"], devices_csv=HERE / "devices.csv")
    assert restarted.test_client().get(stats_url()).get_json() == answer
    assert stored(restarted) == stored(app)


def test_aggregates_match_the_raw_rows(app, client):
    for path, body in simulator_day(DEVICE)[:300]:
        client.post(path, json=body)
    with sqlite3.connect(app.config["DATABASE"]) as db:
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


def test_database_is_in_wal_mode(app):
    with sqlite3.connect(app.config["DATABASE"]) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# --- A real server ---------------------------------------------------------------------


def test_simulator_day_over_waitress_with_16_threads(app):
    """The simulator's day for all five devices, spread over 16 clients, so
    every device is written from several threads at once; then the published table."""
    requests = [request for device_id in SIMULATOR_DAY for request in simulator_day(device_id)]
    random.Random(16).shuffle(requests)
    with waitress_server(app, threads=8) as port:

        def send(share):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            answers = [http_request(connection, "POST", path, body) for path, body in share]
            connection.close()
            return answers

        with ThreadPoolExecutor(16) as pool:
            answers = [answer for share in pool.map(send, [requests[i::16] for i in range(16)]) for answer in share]
        assert answers == [(204, b"")] * len(requests)

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for device_id, (_, uptime, avg_upload_time) in SIMULATOR_DAY.items():
            status, body = http_request(connection, "GET", stats_url(device_id))
            stats = json.loads(body)
            assert (status, f"{stats['uptime']:.5f}", stats["avg_upload_time"]) == (200, uptime, avg_upload_time)
        connection.close()


def test_every_acknowledged_heartbeat_survives_kill_9(tmp_path):
    database = tmp_path / "fleetmon.db"
    acknowledged = []
    enough = threading.Event()

    with server_process(str(HERE / "fleetmon.py"), "--port", "0", "--db", str(database)) as (process, port, printed):
        assert printed == [
            f"fleetmon: 5 devices from {HERE / 'devices.csv'}, database {database}\n",
            f"fleetmon: listening on http://127.0.0.1:{port}/api/v1 (docs at http://127.0.0.1:{port}/docs/)\n",
        ]

        def stream():
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                for minute in range(100_000):
                    sent_at = rfc3339(SIMULATOR_START + timedelta(minutes=minute))
                    if http_request(connection, "POST", heartbeat_url(), {"sent_at": sent_at}) == (204, b""):
                        acknowledged.append(utc_minute(sent_at))
                    if len(acknowledged) >= 300:
                        enough.set()
            except (OSError, http.client.HTTPException):
                pass  # the server was killed mid-request
            finally:
                enough.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert enough.wait(timeout=60)
        process.kill()
        process.wait()
        streamer.join(timeout=60)

    assert len(acknowledged) >= 300
    restarted = create_app(database=database, devices_csv=HERE / "devices.csv")
    minutes = {minute for (device_id, minute) in stored(restarted)["heartbeat_minutes"]}
    assert minutes.issuperset(acknowledged)
    response = restarted.test_client().get("/debug/stats/" + DEVICE).get_json()
    assert response["online_minutes"] == len(minutes)  # the aggregates committed with the rows


# --- The document, the docs page, the root and the debug views -------------------------


def test_openapi_document_is_valid_and_names_the_server_that_answered(client):
    response = client.get("/openapi.json", base_url="http://127.0.0.1:7000")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    document = response.get_json()
    openapi_spec_validator.validate(document)
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


def test_docs_are_swagger_ui_served_by_fleetmon_alone(client):
    assert client.get("/docs").status_code == 308
    assert client.get("/docs").headers["Location"].endswith("/docs/")
    page = client.get("/docs/")
    assert page.status_code == 200
    assert page.content_type == "text/html; charset=utf-8"
    html = page.get_data(as_text=True)
    assert 'url: "/openapi.json"' in html
    assets = re.findall(r'(?:src|href)="\./([^"]+)"', html)
    assert set(assets) == {"swagger-ui.css", "favicon-32x32.png", "favicon-16x16.png",
                           "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js"}
    for asset in assets:
        assert client.get(f"/docs/{asset}").status_code == 200
    assert "http://" not in html and "https://" not in html  # nothing from the network


def test_root_says_what_this_is(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert response.get_json() == {
        "name": "fleetmon",
        "version": "1.0.0",
        "devices": 5,
        "links": {
            "docs": "/docs/",
            "openapi": "/openapi.json",
            "example_stats": "/api/v1/devices/18-b8-87-e7-1f-06/stats",
        },
    }
    assert client.get(response.get_json()["links"]["example_stats"]).status_code == 204


def test_root_with_no_devices_has_no_example(tmp_path):
    (tmp_path / "devices.csv").write_text("device_id\n")
    app = create_app(database=tmp_path / "fleetmon.db", devices_csv=tmp_path / "devices.csv")
    body = app.test_client().get("/").get_json()
    assert (body["devices"], body["links"]["example_stats"]) == (0, None)


def test_debug_devices_lists_what_each_device_sent(client):
    client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:00:00Z"})
    client.post(heartbeat_url(), json={"sent_at": "2024-01-01T10:00:30Z"})
    client.post(stats_url(OTHER_DEVICE), json={"sent_at": "2024-01-01T10:00:00Z", "upload_time": 1})
    response = client.get("/debug/devices")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert response.get_json() == {"devices": [
        {"device_id": "18-b8-87-e7-1f-06", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "26-9a-66-01-33-83", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "38-4e-73-e0-33-59", "has_sent": False, "online_minutes": 0, "upload_count": 0},
        {"device_id": "60-6b-44-84-dc-64", "has_sent": True, "online_minutes": 1, "upload_count": 0},
        {"device_id": "b4-45-52-a2-f1-3c", "has_sent": True, "online_minutes": 0, "upload_count": 1},
    ]}


def test_debug_devices_leaves_out_devices_no_longer_in_the_csv(app, tmp_path):
    (tmp_path / "fewer.csv").write_text(f"device_id\n{DEVICE}\n")
    fewer = create_app(database=app.config["DATABASE"], devices_csv=tmp_path / "fewer.csv")
    devices = fewer.test_client().get("/debug/devices").get_json()["devices"]
    assert [device["device_id"] for device in devices] == [DEVICE]


def test_debug_stats_of_a_device_that_sent_nothing(client):
    response = client.get(f"/debug/stats/{DEVICE}")
    assert response.status_code == 200
    assert response.get_json() == {
        "device_id": DEVICE, "online_minutes": 0, "first_online_minute": None, "last_online_minute": None,
        "upload_count": 0, "upload_total_ns": 0, "stats": None,
    }


def test_debug_stats_show_the_telemetry_behind_the_stats(client):
    for path, body in simulator_day(DEVICE):
        client.post(path, json=body)
    response = client.get(f"/debug/stats/{DEVICE}")
    assert response.status_code == 200
    assert response.content_type == "application/json"
    assert response.get_json() == {
        "device_id": DEVICE,
        "online_minutes": 479,
        "first_online_minute": "2024-01-01T10:00:00Z",
        "last_online_minute": "2024-01-01T18:00:00Z",
        "upload_count": 100,
        "upload_total_ns": 18_789_337_913_437,
        "stats": {"uptime": 479 / 480 * 100, "avg_upload_time": "3m7.893379134s"},
    }
    assert response.get_json()["stats"] == client.get(stats_url()).get_json()


def test_debug_stats_of_an_unknown_device_is_404(client):
    response = client.get("/debug/stats/unknown")
    assert response.status_code == 404
    assert response.get_json() == {"msg": "device not found"}


# Loaded from the file, which the first test above shows is what /openapi.json serves;
# each case is then sent to a fresh app in-process.
api_document = schemathesis.openapi.from_path(HERE / "openapi.json")
api_document.config.update(parameters={"path.device_id": DEVICE})
api_document.config.generation.update(max_examples=30)


@api_document.parametrize()
# One app for all cases, on purpose: what one case stores, a later one reads. The same
# cases every run, so that a rare one cannot make CI flaky.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True)
def test_the_document_tells_the_truth(app, case):
    case.call_and_validate(app=app)


# --- Hostile input ------------------------------------------------------------------------

# Each example reuses the test's app: the database grows, and every example must leave it
# unchanged unless it was answered 204.
hostile = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


@pytest.mark.parametrize("path", [heartbeat_url(), stats_url()])
@hostile
@given(body=st.binary(max_size=2_000))
def test_any_bytes_as_body(app, client, path, body):
    before = stored(app)
    assert_answered_safely(app, client.post(path, data=body), before)


@pytest.mark.parametrize("path", [heartbeat_url(), stats_url()])
@hostile
@given(body=json_values | bodies)
def test_any_json_as_body(app, client, path, body):
    before = stored(app)
    assert_answered_safely(app, client.post(path, data=json.dumps(body)), before)


@hostile  # a "/" is no part of an id but a path separator: test_unknown_path_is_404_json
@given(device_id=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/"), min_size=1))
def test_any_device_id(app, client, device_id):
    before = stored(app)
    quoted = urllib.parse.quote(device_id, safe="")
    for method, path in (("post", heartbeat_url(quoted)), ("post", stats_url(quoted)),
                         ("get", stats_url(quoted)), ("get", f"/debug/stats/{quoted}")):
        response = getattr(client, method)(path, json={"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1})
        assert response.status_code == 404
        assert response.content_type == "application/json"
    assert stored(app) == before


def minute_by_strptime(sent_at):
    """The UTC minute of an accepted sent_at, worked out apart from utc_minute."""
    local = datetime.strptime(sent_at[:16], "%Y-%m-%dT%H:%M")
    offset = timedelta(0)
    if not sent_at.endswith("Z"):
        offset = timedelta(hours=int(sent_at[-5:-3]), minutes=int(sent_at[-2:]))
        offset = -offset if sent_at[-6] == "-" else offset
    return (local - offset - datetime(1970, 1, 1)) // timedelta(minutes=1)


@hostile
@given(sent_at=st.text() | near_valid_sent_at)
def test_any_sent_at(app, client, sent_at):
    before = stored(app)
    response = client.post(heartbeat_url(), json={"sent_at": sent_at})
    assert response.status_code in (204, 400)
    assert_answered_safely(app, response, before)
    if response.status_code == 204:
        assert (DEVICE, minute_by_strptime(sent_at)) in stored(app)["heartbeat_minutes"]


# --- Benchmark: FLEETMON_BENCHMARK=1 python -m pytest -k benchmark -s ----------------------

# The floors: Flask on waitress doing nothing but parse the JSON body and answer 204
# ("nothing"), or that and commit the body to SQLite as fleetmon would ("commit").
FLOOR_APP = """
import json, logging, sqlite3, sys, tempfile, threading, waitress
from pathlib import Path
from flask import Flask, request
threads, mode = int(sys.argv[1]), sys.argv[2]
logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as fleetmon does
database = Path(tempfile.mkdtemp()) / "floor.db"
sqlite3.connect(database).executescript(
    "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL; CREATE TABLE bodies (body TEXT);"
)
connections = threading.local()
app = Flask("floor")
@app.post("/api/v1/devices/<device_id>/<kind>")
def accept(device_id, kind):
    body = json.loads(request.get_data())
    if mode == "commit":
        if not hasattr(connections, "db"):
            connections.db = sqlite3.connect(database, isolation_level=None)
            connections.db.execute("PRAGMA synchronous = NORMAL")
        connections.db.execute("INSERT INTO bodies VALUES (?)", (json.dumps(body),))
    return "", 204
server = waitress.create_server(app, host="127.0.0.1", port=0, threads=threads)
print(f"listening on http://127.0.0.1:{server.effective_port}", flush=True)
server.run()
"""


def peak_memory_mb(process):
    """Peak resident memory of a process; Linux only, None elsewhere."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def run_load(port, requests_by_client):
    """Send each client's (method, path, body) list over its own connection.

    http.client opens it again whenever the server closes it, as waitress does after
    every 204 (see README.md, "Performance and limits").

    Returns (requests per second, p50 ms, p99 ms, answers other than 2xx).
    """
    def client(requests):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        timings, errors = [], 0
        for method, path, body in requests:
            started = time.perf_counter()
            connection.request(method, path, body=body)
            response = connection.getresponse()
            response.read()
            timings.append(time.perf_counter() - started)
            errors += not 200 <= response.status < 300
        connection.close()
        return timings, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(len(requests_by_client)) as pool:
        results = list(pool.map(client, requests_by_client))
    elapsed = time.perf_counter() - started
    timings = sorted(t for client_timings, _ in results for t in client_timings)
    return (len(timings) / elapsed, 1000 * timings[len(timings) // 2],
            1000 * timings[int(len(timings) * 0.99)], sum(errors for _, errors in results))


def telemetry_load(kind, run, clients=16, per_client=1_000):
    """Heartbeats (each in a minute not yet stored, so each one writes) or uploads,
    spread over the devices: one list of requests for each client."""
    devices = sorted(SIMULATOR_DAY)
    url = heartbeat_url if kind == "heartbeat" else stats_url

    def body(client, n):
        minute = (run * clients + client) * per_client + n
        sent_at = rfc3339(SIMULATOR_START + timedelta(minutes=minute))
        return json.dumps({"sent_at": sent_at, "upload_time": 187_893_379_134} if kind == "stats" else {"sent_at": sent_at})

    return [
        [("POST", url(devices[client % 5]), body(client, n)) for n in range(per_client)]
        for client in range(clients)
    ]


def best_of_three_in_turns(ports, make_load):
    """Load each server in turn, three times over, and keep each one's best run.

    Taking turns makes the machine's other work slow them all alike; keeping the best
    leaves out the runs it slowed the most.
    """
    runs = {name: [] for name in ports}
    for run in range(3):
        for name, port in ports.items():
            runs[name].append(run_load(port, make_load(run)))
    return {name: max(figures, key=lambda f: f[0]) for name, figures in runs.items()}


def fill_heartbeats(database, per_device):
    """Store per_device heartbeat minutes for each device, in the order they would arrive.

    Returns the database's size per stored heartbeat minute, in bytes.
    """
    create_app(database=database, devices_csv=HERE / "devices.csv")  # the schema, triggers included
    db = sqlite3.connect(database)
    with db:
        db.executemany(
            "INSERT INTO heartbeat_minutes VALUES (?, ?)",
            ((device_id, minute) for minute in range(per_device) for device_id in sorted(SIMULATOR_DAY)),
        )
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return database.stat().st_size / (per_device * len(SIMULATOR_DAY))


@pytest.mark.skipif(not os.environ.get("FLEETMON_BENCHMARK"), reason="set FLEETMON_BENCHMARK=1 to run the benchmark")
def test_benchmark(tmp_path):
    def report(name, figures):
        rate, p50, p99, errors = figures
        print(f"{name:<48} {rate:6.0f} req/s   p50 {p50:5.2f} ms   p99 {p99:5.2f} ms   errors {errors}")

    print(f"\nfleetmon benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"16 clients, waitress threads={fleetmon.WAITRESS_THREADS}, best of 3 interleaved runs")
    threads = str(fleetmon.WAITRESS_THREADS)
    with server_process("-c", FLOOR_APP, threads, "nothing") as (_, nothing_port, _), \
            server_process("-c", FLOOR_APP, threads, "commit") as (_, commit_port, _), \
            server_process(str(HERE / "fleetmon.py"), "--port", "0", "--db", str(tmp_path / "load.db")) as (process, port, _):
        burst = [[("POST", path, json.dumps(body)) for path, body in simulator_day(device_id)]
                 for device_id in SIMULATOR_DAY]
        started = time.perf_counter()
        errors = run_load(port, burst)[3]
        print(f"{'simulator burst, 5 clients, fresh database':<48} {sum(map(len, burst))} requests in "
              f"{time.perf_counter() - started:.2f} s, errors {errors}")

        ports = {"floor: do nothing": nothing_port, "floor: commit one row": commit_port, "fleetmon": port}
        for kind in ("heartbeat", "stats"):
            best = best_of_three_in_turns(ports, lambda run: telemetry_load(kind, run + 1))
            for name, figures in best.items():
                report(f"{name}, POST {kind}", figures)
            print(f"{'':<48} fleetmon: {best['fleetmon'][0] / best['floor: do nothing'][0]:.0%} of doing nothing, "
                  f"{best['fleetmon'][0] / best['floor: commit one row'][0]:.0%} of committing one row")

        peak = peak_memory_mb(process)
        print(f"{'peak memory of the fleetmon process':<48} " + (f"{peak:.0f} MB" if peak else "n/a (Linux only)"))

    small, large = tmp_path / "small.db", tmp_path / "large.db"
    fill_heartbeats(small, 1_000)
    row_size = fill_heartbeats(large, 1_000_000)
    with server_process(str(HERE / "fleetmon.py"), "--port", "0", "--db", str(small)) as (_, small_port, _), \
            server_process(str(HERE / "fleetmon.py"), "--port", "0", "--db", str(large)) as (_, large_port, _):
        ports = {"GET stats, 1,000 heartbeats stored": small_port, "GET stats, 1,000,000 heartbeats stored": large_port}
        for name, figures in best_of_three_in_turns(ports, lambda run: [[("GET", stats_url(), None)] * 2_000]).items():
            report(name, figures)
    print(f"{'database size per stored heartbeat minute':<48} {row_size:.0f} bytes")
