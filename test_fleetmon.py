"""The contract, as the spec's examples: fleetmon.py's maths (durations, uptime, sent_at),
the devices file, the three endpoints with their errors and hostile input, and what is
stored: the aggregates, kept in step with the raw rows, surviving a restart and kill -9.

Everything an operator needs around it is tested in tests/, a file per concern; the
fixtures and helpers all share are in conftest.py. Run with ``python -m pytest``.
"""

import json
import random
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection, HTTPException

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleetmon
import simulator
from conftest import (
    DEVICE,
    DEVICES_CSV,
    HTML,
    OTHER_DEVICE,
    SENT_AT,
    WallClock,
    heartbeat,
    heartbeat_url,
    http_request,
    open_app,
    query,
    restarted,
    send,
    send_day,
    server_process,
    stats_url,
    stored,
    stored_minutes,
    stored_uploads,
    upload,
)
from fleetmon import (
    FIRST_MINUTE,
    INT64_MAX,
    StartupError,
    go_duration,
    human_duration,
    load_device_ids,
    mean_ns,
    minute_to_rfc3339,
    ms_to_rfc3339,
    uptime_percent,
    utc_minute,
)
from simulator import PUBLISHED_DAYS, simulated_day

# --- Durations ----------------------------------------------------------------------------

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
def test_go_duration_matches_go(ns, text):
    assert go_duration(ns) == text


@pytest.mark.parametrize(
    ("total_ns", "count", "mean"),
    [(0, 0, 0), (7, 1, 7), (10, 3, 3), (11, 3, 3), (18_789_337_913_437, 100, 187_893_379_134),
     (INT64_MAX, 1, INT64_MAX), (INT64_MAX, 2, 4_611_686_018_427_387_903)],
)
def test_mean_ns_truncates(total_ns, count, mean):
    assert mean_ns(total_ns, count) == mean


SECOND = 1_000_000_000


# The one duration a person reads: the pages, the server window and the alerts. About
# three figures, each unit up to where it would round to the next one's first value.
@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0 ns"), (999, "999 ns"), (1_500, "2 µs"), (999_499, "999 µs"), (999_500, "1 ms"),
        (850_000_000, "850 ms"), (999_499_999, "999 ms"), (999_999_999, "1 s"), (45 * SECOND, "45 s"),
        (45_240_000_000, "45.2 s"), (59_949_999_999, "59.9 s"), (59_999_999_999, "1 min"),
        (201_858_747_766, "3 min 22 s"), (300 * SECOND, "5 min"), (432 * SECOND, "7 min 12 s"),
        (3_900 * SECOND, "1 h 5 min"), (7_500 * SECOND, "2 h 5 min"), (7_230 * SECOND, "2 h"),
        (90_000 * SECOND, "1 d 1 h"), (86_399_600_000_000, "1 d"),
        (-5, "0 ns"), (-5 * SECOND, "0 ns"),  # never negative: a clock set back shows no "-3 s ago"
    ],
)
def test_human_duration(ns, text):
    assert human_duration(ns) == text


# --- Uptime and sent_at -------------------------------------------------------------------


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


def test_times_are_written_as_the_pages_script_reads_them():
    assert minute_to_rfc3339(FIRST_MINUTE) == "0001-01-01T00:00:00Z"  # four digits, as Date.parse wants
    assert minute_to_rfc3339(-1) == "1969-12-31T23:59:00Z"
    # fleetmon's own clock, to the millisecond
    assert ms_to_rfc3339(1_704_103_440_250) == "2024-01-01T10:04:00.250Z"
    assert ms_to_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert ms_to_rfc3339(-1) == "1969-12-31T23:59:59.999Z"


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


# --- The devices file ---------------------------------------------------------------------

NO_DEVICE_ID_COLUMN = "devices file {path} has no device_id column in its first line"
NO_DEVICES = "devices file {path} lists no devices under device_id"


def read_devices(read_device_ids, error, path):
    """The sorted ids a reader finds in a devices file, or the text of its refusal."""
    try:
        return sorted(read_device_ids(path))
    except error as raised:
        return str(raised)


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
    expected = outcome.format(path=path) if isinstance(outcome, str) else outcome
    assert read_devices(load_device_ids, StartupError, path) == expected
    assert read_devices(simulator.read_device_ids, simulator.SimulatorError, path) == expected


# Where the comma is the decimal sign, Excel separates a CSV's fields with semicolons.
SEMICOLONS = [
    (b"\xef\xbb\xbfname;device_id\r\nA;aa-01\r\nB; bb-02 \r\n", ["aa-01", "bb-02"]),
    (b"device_id,name\r\naa;01,A\r\n", ["aa;01"]),  # a comma in the first line: commas separate
]


@pytest.mark.parametrize(("content", "device_ids"), SEMICOLONS)
def test_fleetmon_reads_a_devices_file_separated_by_semicolons(tmp_path, content, device_ids):
    path = tmp_path / "devices.csv"
    path.write_bytes(content)
    assert sorted(load_device_ids(path)) == device_ids


@pytest.mark.parametrize(("content", "device_ids"), SEMICOLONS[:1])
def test_the_simulator_reads_a_devices_file_separated_by_semicolons_as_fleetmon_does(tmp_path, content, device_ids):
    path = tmp_path / "devices.csv"
    path.write_bytes(content)
    assert read_devices(simulator.read_device_ids, simulator.SimulatorError, path) == device_ids


@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        (b"device_id\naa-01\n\nbb/02\n", "line 4: no URL can carry the device id 'bb/02'"),
        (b"device_id\n.\n", "line 2: no URL can carry the device id '.'"),
        (b"device_id\naa-01\n ..\n", "line 3: no URL can carry the device id '..'"),
        # A control character would start a new line, or worse, wherever the id is printed.
        (b"device_id\naa-01\naa\x07bb\n", r"line 3: the device id 'aa\x07bb' has a control character"),
        (b'device_id\n"aa\tbb"\n', r"line 2: the device id 'aa\tbb' has a control character"),
        (b"device_id\naa\x1b[31mbb\n", r"line 2: the device id 'aa\x1b[31mbb' has a control character"),
        # Characters that str.splitlines() would take for line breaks are no line breaks in CSV...
        (b"device_id\naa\x1cbb\n", r"line 2: the device id 'aa\x1cbb' has a control character"),
        (b"device_id\naa\x0bbb\n", r"line 2: the device id 'aa\x0bbb' has a control character"),
        ("device_id\naa\u2028bb\n".encode(), r"line 2: the device id 'aa\u2028bb' has a control character"),
        # ...and a line break in quotes is part of the id.
        (b'device_id\n"cam\r\nfleetmon: forged"\n',
         r"line 2: the device id 'cam\r\nfleetmon: forged' has a control character"),
    ],
)
def test_fleetmon_refuses_a_device_id_no_url_can_carry_or_with_a_control_character(tmp_path, content, refusal):
    path = tmp_path / "devices.csv"
    path.write_bytes(content)
    with pytest.raises(StartupError) as refused:
        load_device_ids(path)
    assert str(refused.value) == f"devices file {path}, {refusal}"


# --- The three endpoints ------------------------------------------------------------------


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


# --- Errors -------------------------------------------------------------------------------


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
     "/api/v1//devices/60-6b-44-84-dc-64/stats", "/api/v1/devices//stats", "/api/v2/x", "/robots.txt"],
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


@pytest.mark.parametrize("path", BOTH)
def test_a_sent_at_more_than_a_day_ahead_of_fleetmons_clock_is_400_and_stores_nothing(app, client, monkeypatch, path):
    """No device's real clock is that far ahead; counted, one such heartbeat would stretch
    its uptime span for good. The past stays open: the simulator replays a day of 2024."""
    WallClock(monkeypatch)  # 2024-01-01T10:04:00Z
    send(client, (path, {"sent_at": "2024-01-02T10:04:00Z", "upload_time": 1}),  # a day ahead: taken
         (path, {"sent_at": "2024-01-02T11:04:00+01:00", "upload_time": 1}),
         (path, {"sent_at": "1970-01-01T00:00:00Z", "upload_time": 1}))
    for sent_at in ("2024-01-02T10:04:01Z", "2024-01-02T06:04:01-04:00", "9999-12-31T23:59:59Z"):
        assert_refused(app, client, path, {"sent_at": sent_at, "upload_time": 1}, 400,
                       "sent_at is more than a day ahead of fleetmon's clock (2024-01-01T10:04:00.000Z)")


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


def a_table_gone(app, monkeypatch):
    query(app, "DROP TABLE uploads")
    return "OperationalError: no such table: main.uploads"


def a_bug(app, monkeypatch):
    def record_upload(*args):
        raise KeyError("device_key")

    monkeypatch.setattr(fleetmon, "record_upload", record_upload)
    return "KeyError: 'device_key'"


@pytest.mark.parametrize("failure", [a_table_gone, a_bug])
def test_an_unexpected_error_is_500_json_with_the_details_in_the_log_only(app, client, caplog, monkeypatch, failure):
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as in production, not raise into the test
    logged = failure(app, monkeypatch)
    before = stored(app, ("devices", "online_hours"))
    response = client.post(stats_url(), json={"sent_at": SENT_AT, "upload_time": 5})
    assert response.status_code == 500
    assert response.get_json() == {
        "msg": "The server encountered an internal error and was unable to complete your request. "
               "Either the server is overloaded or there is an error in the application."
    }
    assert stored(app, ("devices", "online_hours")) == before
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == [
        f"POST {stats_url()} failed: {logged}"]


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
# listed ids are left out: Hypothesis draws strings from the modules' source too.
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


# --- What is stored -----------------------------------------------------------------------


def test_the_aggregates_match_the_raw_rows_and_a_restart_gives_the_same_stats(app, client):
    send_day(client, simulated_day(DEVICE)[:300])
    minutes, uploads = stored_minutes(app), stored_uploads(app)
    assert query(app, "SELECT online_minutes, first_minute, last_minute, upload_count, upload_total_ns FROM devices"
                      " WHERE device_id = ?", (DEVICE,)) == [
        (len(minutes), min(minutes), max(minutes), len(uploads), sum(upload[2] for upload in uploads))]
    stats, before = client.get(stats_url()).get_json(), stored(app)
    with restarted(app) as again:  # schema.sql applied again
        assert again.test_client().get(stats_url()).get_json() == stats
        assert stored(again) == before


def test_concurrent_writers_never_see_database_is_locked(app):
    """As under `flask run`, a thread a request: writers wait their turn for SQLite's lock."""
    def write_day(device_id):
        client = app.test_client()
        for event in simulated_day(device_id)[:300]:
            assert client.post(event.path, json=event.body).status_code == 204
        return client.get(stats_url(device_id)).status_code

    with ThreadPoolExecutor(max_workers=5) as pool:
        assert list(pool.map(write_day, sorted(PUBLISHED_DAYS))) == [200] * 5


def test_every_acknowledged_heartbeat_survives_kill_9(tmp_path):
    database = tmp_path / "fleetmon.db"
    first_minute = utc_minute("2024-01-01T10:00:00Z")
    acknowledged = []
    enough = threading.Event()

    with server_process("--port", "0", "--db", database) as (process, port, printed, _):
        assert printed[0] == f"fleetmon: 5 devices from {DEVICES_CSV}, database {database}\n"

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
    with open_app(database) as again:  # the killed one's lock went with it
        minutes = set(stored_minutes(again))
        assert minutes.issuperset(acknowledged)
        debug = again.test_client().get(f"/debug/stats/{DEVICE}").get_json()
        assert debug["online_minutes"] == len(minutes)  # the aggregates committed with the rows
