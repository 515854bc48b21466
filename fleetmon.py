"""fleetmon: uptime and average upload time for a fleet of edge devices.

Devices post a heartbeat every minute and, after each video upload, how long it took.
fleetmon keeps both in SQLite and answers, per device, its uptime and its mean upload
time, exactly as the device simulator computes them.

    python fleetmon.py             serve (see --help)
    python fleetmon.py simulate    drive a running fleetmon with a simulated day

``flask --app fleetmon run`` works too, for development.
"""

import argparse
import csv
import errno
import http.client
import json
import logging
import math
import os
import re
import socket
import sqlite3
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from heapq import merge
from http.client import HTTPConnection
from pathlib import Path
from random import Random
from typing import NamedTuple
from urllib.parse import urlsplit

import waitress
from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    g,
    render_template,
    request,
    url_for,
)
from swagger_ui_bundle import swagger_ui_path
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask, WSGITask
from werkzeug.exceptions import HTTPException

# --- Configuration ------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
DEFAULT_DEVICES_CSV = HERE / "devices.csv"
DEFAULT_DATABASE = HERE / "fleetmon.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6733

MAX_BODY_BYTES = 64 * 1024
INT64_MAX = 2**63 - 1
# Python will not turn a longer run of digits into an int (sys.get_int_max_str_digits).
MAX_JSON_INTEGER_DIGITS = 4300
# How long a statement waits for another process's write lock on the same database
# before it fails. A write holds the lock for microseconds, a WAL checkpoint for milliseconds.
BUSY_TIMEOUT_SECONDS = 10
# Connections kept open between requests; more than the worker threads, so that
# `flask run`, with a thread a request, reuses them too.
IDLE_CONNECTIONS_KEPT = 8
FLEET_PAGE_ROWS = 100
MAX_FLEET_PAGE = 1_000_000
DEBUG_PAGE_LIMIT = 1000
STRIP_MINUTES = 24 * 60
ACTIVITY_INTERVAL_SECONDS = 10

# How waitress serves fleetmon (README.md, "Performance" and "Reliability", says why):
WAITRESS_SETTINGS = {
    # Python runs one thread at a time and SQLite takes one writer at a time, so more
    # worker threads only add hand-offs. Slow clients hold no worker: waitress reads and
    # writes sockets in a thread of its own.
    "threads": 1,
    # Enough for hundreds of idle or slow clients while staying under the 512 sockets
    # that select() can watch on Windows.
    "connection_limit": 450,
    # Drop a connection that has sent nothing for this long, checked this often.
    "channel_timeout": 15,
    "cleanup_interval": 5,
    # Let the socket thread send a response of up to this many bytes, not the worker:
    # a worker sending for itself leaves the socket thread spinning on the channel's lock
    # and holding the GIL while the worker waits for it, which collapses throughput
    # with many clients. waitress 3.0.2 still honours it, with a DeprecationWarning.
    "send_bytes": 18_000,
    # Refuse a larger body from its Content-Length, before reading it. waitress refuses
    # a length equal to its limit too, hence the one byte more.
    "max_request_body_size": MAX_BODY_BYTES + 1,
}


class StartupError(Exception):
    """A problem that stops fleetmon from starting, told in one line."""


# --- Devices file -------------------------------------------------------------------


def load_device_ids(path: Path) -> frozenset[str]:
    """Read the ids under the ``device_id`` column of a CSV file.

    Tolerates what spreadsheets write: a UTF-8 byte-order mark, spaces around values,
    blank lines and repeated ids. Refuses a file that lists no device, and an id that
    no URL can reach.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(enumerate(csv.reader(file), start=1))
    except OSError as error:
        raise StartupError(f"cannot read devices file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"devices file {path} is not UTF-8 text") from None
    header = [name.strip() for name in rows[0][1]] if rows else []
    if "device_id" not in header:
        raise StartupError(f"devices file {path} has no device_id column in its first line")
    column = header.index("device_id")
    device_ids = set()
    for line, row in rows[1:]:
        device_id = row[column].strip() if len(row) > column else ""
        if "/" in device_id:
            raise StartupError(f"devices file {path}, line {line}: device id {device_id!r} contains '/', "
                               "which no URL can carry")
        if device_id:
            device_ids.add(device_id)
    if not device_ids:
        raise StartupError(f"devices file {path} lists no devices under device_id")
    return frozenset(device_ids)


# --- Storage ------------------------------------------------------------------------


def connect(database: Path) -> sqlite3.Connection:
    # Autocommit: each statement below is a whole transaction, committed before execute()
    # returns, triggers included. So a 204 is only sent for what is committed.
    # check_same_thread=False: the pool lends a connection to one request at a time,
    # whichever thread serves it.
    db = sqlite3.connect(
        database, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
    )
    db.row_factory = sqlite3.Row
    try:
        # In WAL mode, NORMAL still makes every commit survive the process being killed;
        # only a power cut or OS crash can take back the last few.
        db.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error:  # a file that is not a database, say
        db.close()
        raise
    return db


class ConnectionPool:
    """Open connections to one database, each lent to one request at a time.

    Flask's tutorial opens a connection per request; keeping them costs nothing and
    saves more than the rest of a heartbeat costs (README.md, "Performance").
    """

    def __init__(self, database: Path):
        self.database = database
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def borrow(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return connect(self.database)

    def give_back(self, db: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS_KEPT:
                self._idle.append(db)
                return
        db.close()  # one too many, or a request that outlived the pool

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()


def init_storage(app: Flask) -> None:
    """Apply schema.sql, list the app's devices, and give the app its connections."""
    database = app.config["DATABASE"]
    try:
        with closing(connect(database)) as db:
            with app.open_resource("schema.sql") as schema:
                db.executescript(schema.read().decode("utf-8"))
            db.execute("BEGIN")
            db.execute("DELETE FROM listed_devices")
            db.executemany(
                "INSERT INTO listed_devices (device_id) VALUES (?)",
                ((device_id,) for device_id in app.config["DEVICE_IDS"]),
            )
            # "WHERE true": SQLite's grammar needs a WHERE before the ON CONFLICT of an INSERT ... SELECT.
            db.execute(
                "INSERT INTO device_stats (device_id) SELECT device_id FROM listed_devices WHERE true"
                " ON CONFLICT (device_id) DO NOTHING"
            )
            db.execute("COMMIT")
    except sqlite3.Error as error:
        raise StartupError(f"cannot use database {database}: {error}") from None
    app.extensions["fleetmon.pool"] = ConnectionPool(database)
    # Under waitress one worker thread writes and this lock is never contended. Under
    # `flask run` or in threaded tests, concurrent writers queue here and are handed the
    # database at once, instead of polling SQLite's lock between sleeps. It orders the
    # writers of this process only; another process is waited for by the busy timeout.
    app.extensions["fleetmon.write_lock"] = threading.Lock()
    app.teardown_appcontext(release_db)


def close_storage(app: Flask) -> None:
    """Close the app's idle connections: the end of its life (a test's, the server's)."""
    app.extensions["fleetmon.pool"].close()


def get_db() -> sqlite3.Connection:
    """The connection this request uses, borrowed from the app's pool."""
    if "db" not in g:
        g.db = current_app.extensions["fleetmon.pool"].borrow()
    return g.db


def release_db(error: BaseException | None) -> None:
    """Give the request's connection back; close it instead if a database error
    ended the request, so that the next request starts afresh (for instance on a
    connection SQLite opened read-only while the file was read-only)."""
    db = g.pop("db", None)
    if db is None:
        return
    if isinstance(error, sqlite3.Error):
        db.close()
    else:
        current_app.extensions["fleetmon.pool"].give_back(db)


def write_lock() -> threading.Lock:
    return current_app.extensions["fleetmon.write_lock"]


def record_heartbeat(db: sqlite3.Connection, device_id: str, minute: int) -> None:
    """Mark a minute online; the trigger count_online_minute updates device_stats."""
    db.execute(
        "INSERT INTO heartbeat_minutes (device_id, minute) VALUES (?, ?)"
        " ON CONFLICT (device_id, minute) DO NOTHING",
        (device_id, minute),
    )


def record_upload(db: sqlite3.Connection, device_id: str, sent_at: str, upload_time_ns: int) -> bool:
    """Store one upload, and through the trigger add_upload count it in device_stats.

    Returns False, storing nothing, if it would overflow the device's total: SQLite would
    turn the sum into an inexact float, so the guard is written so that it cannot overflow.
    """
    inserted = db.execute(
        """
        INSERT INTO uploads (device_id, sent_at, upload_time_ns)
        SELECT device_id, :sent_at, :upload_time_ns
        FROM device_stats
        WHERE device_id = :device_id AND upload_total_ns <= :int64_max - :upload_time_ns
        """,
        {"device_id": device_id, "sent_at": sent_at, "upload_time_ns": upload_time_ns, "int64_max": INT64_MAX},
    ).rowcount
    return inserted == 1


def read_device_stats(db: sqlite3.Connection, device_id: str) -> sqlite3.Row:
    return db.execute("SELECT * FROM device_stats WHERE device_id = ?", (device_id,)).fetchone()


def read_listed_stats(db: sqlite3.Connection, after: str, limit: int) -> list[sqlite3.Row]:
    """The listed devices' aggregates in id order, from the first id after `after`."""
    return db.execute(
        "SELECT * FROM device_stats JOIN listed_devices USING (device_id)"
        " WHERE device_id > ? ORDER BY device_id LIMIT ?",
        (after, limit),
    ).fetchall()


# uptime_percent's twin in SQL, for the fleet page to order and summarise a whole fleet
# without a Python call per device; the same operations in the same order, so the same
# double to the last bit (test_fleetmon.py holds them to it).
UPTIME_SQL = """
    CASE WHEN online_minutes = 0 THEN 0.0
         WHEN last_minute = first_minute THEN 100.0
         ELSE min(online_minutes * 1.0 / (last_minute - first_minute) * 100, 100.0) END"""


def read_fleet_summary(db: sqlite3.Connection) -> tuple[sqlite3.Row, list[float]]:
    """Counts and sums over the listed devices, and the uptimes of those that sent something."""
    reporting = "online_minutes > 0 OR upload_count > 0"
    totals = db.execute(
        f"""
        SELECT count(*) AS known, count(*) FILTER (WHERE {reporting}) AS reporting,
               max(last_minute) AS newest_minute, sum(upload_count) AS uploads,
               -- in two halves, so that neither sum can overflow SQLite's 64-bit integers
               sum(upload_total_ns >> 32) AS total_high, sum(upload_total_ns & 0xffffffff) AS total_low
        FROM device_stats JOIN listed_devices USING (device_id)
        """
    ).fetchone()
    uptimes = db.execute(
        f"SELECT {UPTIME_SQL} FROM device_stats JOIN listed_devices USING (device_id) WHERE {reporting}"
    ).fetchall()
    return totals, [uptime for (uptime,) in uptimes]


ID_CONTAINS = "instr(lower(device_id), lower(:text)) > 0"


def count_matching(db: sqlite3.Connection, text: str) -> int:
    """How many listed devices have an id that contains `text`, in any case."""
    return db.execute(f"SELECT count(*) FROM listed_devices WHERE {ID_CONTAINS}", {"text": text}).fetchone()[0]


def read_worst_first(db: sqlite3.Connection, text: str, offset: int, limit: int) -> list[sqlite3.Row]:
    """A page of the listed devices whose id contains `text`: those that sent something
    first, worst uptime first, then by id."""
    return db.execute(
        f"""
        SELECT * FROM device_stats JOIN listed_devices USING (device_id) WHERE {ID_CONTAINS}
        ORDER BY online_minutes = 0 AND upload_count = 0,
                 {UPTIME_SQL},
                 device_id
        LIMIT :limit OFFSET :offset
        """,
        {"text": text, "limit": limit, "offset": offset},
    ).fetchall()


def read_online_minutes(db: sqlite3.Connection, device_id: str, first: int, last: int) -> list[int]:
    """The device's online minutes from first to last, a bounded range of the index."""
    return [
        minute
        for (minute,) in db.execute(
            "SELECT minute FROM heartbeat_minutes WHERE device_id = ? AND minute BETWEEN ? AND ?"
            " ORDER BY minute",
            (device_id, first, last),
        )
    ]


# --- Pure functions: time, uptime, durations ----------------------------------------

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MINUTE = timedelta(minutes=1)
# RFC 3339 section 5.6, with an explicit offset and at most nanosecond precision.
# Dates and times are range-checked by datetime, the offset here.
RFC3339_DATE_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d{1,9})?(?:Z|([+-])([01]\d|2[0-3]):([0-5]\d))",
    re.ASCII,
)


def utc_minute(sent_at: str) -> int:
    """The UTC minute that contains an RFC 3339 date-time, in minutes since the Unix epoch.

    Seconds and their fraction are dropped. Raises ValueError for anything that is not
    RFC 3339 with an explicit offset, or that falls outside years 1-9999 in UTC.
    """
    match = RFC3339_DATE_TIME.fullmatch(sent_at)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time with an offset: {sent_at!r}")
    year, month, day, hour, minute, second, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    if sign == "-":
        offset = -offset
    local = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second),
        tzinfo=timezone(offset),
    )
    try:
        utc = local.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"outside years 1-9999 in UTC: {sent_at!r}") from None
    return (utc - UNIX_EPOCH) // ONE_MINUTE


def minute_to_rfc3339(minute: int) -> str:
    """The inverse of utc_minute: 28401724 gives '2024-01-01T10:04:00Z'."""
    return (UNIX_EPOCH + minute * ONE_MINUTE).replace(tzinfo=None).isoformat() + "Z"


def uptime_percent(online_minutes: int, first_minute: int | None, last_minute: int | None) -> float:
    """Online minutes as a percentage of the span from the first to the last of them.

    The span is exclusive, as the simulator computes it: 479 minutes online from
    10:00 to 18:00 is 479 / 480. A device online in every minute of that span would
    reach 481 / 480, hence the cap.
    """
    if online_minutes == 0:
        return 0.0
    span = last_minute - first_minute
    if span == 0:
        return 100.0
    return min(online_minutes / span * 100, 100.0)


def mean_ns(total_ns: int, count: int) -> int:
    """Whole nanoseconds; both arguments are non-negative, so // truncates as Go's / does."""
    return total_ns // count if count else 0


def format_duration(ns: int) -> str:
    """Format nanoseconds exactly as Go's time.Duration.String() does.

    0s, 1ns, 1.5µs, 999.999999ms, 1s, 1m0s, 1h2m3.000000001s, -1h0m0s.
    """
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 3)}\u00b5s"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 6)}ms"
    minutes, seconds_ns = divmod(ns, 60_000_000_000)
    hours, minutes = divmod(minutes, 60)
    seconds = _decimal(seconds_ns, 9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return f"{sign}{seconds}"


def _decimal(value: int, places: int) -> str:
    """value / 10**places with no trailing zeros: (1500, 3) gives '1.5', (2000, 3) '2'."""
    whole, fraction = divmod(value, 10**places)
    if fraction == 0:
        return str(whole)
    return f"{whole}.{fraction:0{places}d}".rstrip("0")


def stats_from_aggregates(aggregates: sqlite3.Row) -> dict | None:
    """The stats from a device's row of device_stats; None if the device sent nothing."""
    if aggregates["online_minutes"] == 0 and aggregates["upload_count"] == 0:
        return None
    return {
        "uptime": uptime_percent(
            aggregates["online_minutes"], aggregates["first_minute"], aggregates["last_minute"]
        ),
        "avg_upload_time": format_duration(
            mean_ns(aggregates["upload_total_ns"], aggregates["upload_count"])
        ),
    }


def online_runs(online_minutes: Iterable[int], first: int, last: int) -> list[tuple[bool, int, int]]:
    """Every minute from first to last, as runs of (online, first minute, last minute).

    online_minutes is sorted; ([1, 2, 5], 0, 6) gives
    [(False, 0, 0), (True, 1, 2), (False, 3, 4), (True, 5, 5), (False, 6, 6)].
    """
    runs = []
    expected = first
    for minute in online_minutes:
        if minute > expected:
            runs.append((False, expected, minute - 1))
        if runs and runs[-1][0] and runs[-1][2] == minute - 1:
            runs[-1] = (True, runs[-1][1], minute)
        else:
            runs.append((True, minute, minute))
        expected = minute + 1
    if expected <= last:
        runs.append((False, expected, last))
    return runs


# --- HTTP ---------------------------------------------------------------------------


def create_app(database: Path = DEFAULT_DATABASE, devices_csv: Path = DEFAULT_DEVICES_CSV) -> Flask:
    """The app factory. Raises StartupError for an unusable devices file or database.

    Its owner calls close_storage(app) when done with it.
    """
    app = Flask(__name__, static_folder=None)
    app.config.update(
        DATABASE=Path(database),
        DEVICES_CSV=Path(devices_csv),
        DEVICE_IDS=load_device_ids(Path(devices_csv)),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    # A path with "//" is an unknown path, not a redirect to another one.
    app.url_map.merge_slashes = False
    with app.open_resource("openapi.json") as document:
        app.extensions["fleetmon.openapi"] = json.load(document)
    init_storage(app)
    app.register_blueprint(bp)
    app.register_blueprint(docs_bp)
    return app


bp = Blueprint("fleetmon", __name__)
# Swagger UI from the swagger-ui-bundle package, so that the docs work offline.
docs_bp = Blueprint(
    "docs", __name__, static_folder=swagger_ui_path, static_url_path="/docs", template_folder=swagger_ui_path
)


@bp.app_errorhandler(HTTPException)
def error_as_json(error: HTTPException):
    """Every error, including Flask's own 404, 405, 413 and 500, as {"msg": ...}."""
    response = error.get_response()  # keeps headers such as Allow on a 405
    response.set_data(current_app.json.dumps({"msg": error.description}))
    response.content_type = "application/json"
    return response


@bp.url_value_preprocessor
def require_known_device(endpoint: str | None, values: dict | None) -> None:
    """Every route with a device_id answers 404 for a device not in the devices file,
    whatever the method (OPTIONS too) and the body. A wrong method is found before, and
    leaves no values."""
    if values and "device_id" in values and values["device_id"] not in current_app.config["DEVICE_IDS"]:
        abort(404, "device not found")


def no_content():
    """204: no body, and so no Content-Type either."""
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


class InvalidBody(ValueError):
    """Raised while parsing a body that fleetmon refuses; its text is the answer's msg."""


def _refuse_constant(name: str):
    raise InvalidBody("body is not valid JSON")  # Python's json would accept NaN and Infinity


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INTEGER_DIGITS:
        raise InvalidBody(f"body has an integer of more than {MAX_JSON_INTEGER_DIGITS} digits")
    return int(digits)


def json_object_body() -> dict:
    """The request body as a JSON object, whatever its Content-Type says."""
    try:
        # Decoded here: given bytes, json.loads would also take UTF-16 and UTF-32.
        body = json.loads(request.get_data().decode("utf-8"), parse_constant=_refuse_constant, parse_int=_parse_int)
    except InvalidBody as error:
        abort(400, str(error))
    except RecursionError:
        abort(400, "body is nested too deeply")
    except ValueError:
        abort(400, "body is not valid JSON")
    if not isinstance(body, dict):
        abort(400, "body must be a JSON object")
    return body


def sent_at_minute(body: dict) -> int:
    """Validate body["sent_at"] and return its UTC minute."""
    if "sent_at" not in body:
        abort(400, "sent_at is required")
    message = "sent_at must be an RFC 3339 date-time with an offset, like 2024-01-01T10:04:00Z"
    if not isinstance(body["sent_at"], str):
        abort(400, message)
    try:
        return utc_minute(body["sent_at"])
    except ValueError:
        abort(400, message)


def upload_time_ns(body: dict) -> int:
    """Validate body["upload_time"] and return it."""
    if "upload_time" not in body:
        abort(400, "upload_time is required")
    value = body["upload_time"]
    # type() rather than isinstance(): JSON true arrives as a bool, which is an int.
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        abort(400, f"upload_time must be an integer number of nanoseconds from 0 to {INT64_MAX}")
    return value


def int_argument(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query argument from low to high."""
    text = request.args.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        abort(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


@bp.post("/api/v1/devices/<device_id>/heartbeat")
def post_heartbeat(device_id: str):
    minute = sent_at_minute(json_object_body())
    with write_lock():
        record_heartbeat(get_db(), device_id, minute)
    return no_content()


@bp.post("/api/v1/devices/<device_id>/stats")
def post_stats(device_id: str):
    body = json_object_body()
    sent_at_minute(body)  # validated like a heartbeat's, but not a heartbeat
    upload_time = upload_time_ns(body)
    with write_lock():
        added = record_upload(get_db(), device_id, body["sent_at"], upload_time)
    if not added:
        abort(409, "this upload_time would overflow the device's total upload time "
                   f"({INT64_MAX} ns); nothing was stored")
    return no_content()


@bp.get("/api/v1/devices/<device_id>/stats")
def get_stats(device_id: str):
    stats = stats_from_aggregates(read_device_stats(get_db(), device_id))
    if stats is None:
        return no_content()
    return stats


@bp.get("/")
def index():
    """The fleet page for a browser; for an API client, what this server is."""
    page = int_argument("page", 1, 1, MAX_FLEET_PAGE)  # checked for both, as the document says
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        response = current_app.make_response(fleet_page(request.args.get("q", "").strip(), page))
        response.vary.add("Accept")
        return response
    device_ids = current_app.config["DEVICE_IDS"]
    response = current_app.make_response({
        "name": "fleetmon",
        "version": current_app.extensions["fleetmon.openapi"]["info"]["version"],
        "devices": len(device_ids),
        "links": {
            "fleet_page": url_for(".index"),
            "docs": url_for("docs.docs"),
            "openapi": url_for(".openapi_document"),
            "example_stats": url_for(".get_stats", device_id=min(device_ids)),
        },
    })
    response.vary.add("Accept")  # the same URL answers HTML or JSON
    return response


def fleet_page(text: str, page: int) -> str:
    db = get_db()
    matching = count_matching(db, text)
    pages = max(1, math.ceil(matching / FLEET_PAGE_ROWS))
    page = min(page, pages)  # past the end: the last page
    rows = read_worst_first(db, text, (page - 1) * FLEET_PAGE_ROWS, FLEET_PAGE_ROWS)

    def page_url(number: int) -> str | None:
        if not 1 <= number <= pages:
            return None
        return url_for(".index", page=number, q=text or None)

    return render_template(
        "fleet.html",
        summary=fleet_summary(*read_fleet_summary(db)),
        rows=[fleet_row(db, row) for row in rows],
        q=text,
        page=page,
        pages=pages,
        matching=matching,
        prev_url=page_url(page - 1),
        next_url=page_url(page + 1),
        docs_url=url_for("docs.docs"),
    )


def fleet_summary(totals: sqlite3.Row, uptimes: list[float]) -> dict:
    total_ns = (totals["total_high"] << 32) + totals["total_low"] if totals["uploads"] else 0
    return {
        "known": totals["known"],
        "reporting": totals["reporting"],
        "silent": totals["known"] - totals["reporting"],
        "median_uptime": statistics.median(uptimes) if uptimes else None,
        "mean_upload_time": format_duration(mean_ns(total_ns, totals["uploads"])) if totals["uploads"] else None,
        "newest_heartbeat": minute_to_rfc3339(totals["newest_minute"]) if totals["newest_minute"] is not None else None,
    }


def fleet_row(db: sqlite3.Connection, aggregates: sqlite3.Row) -> dict:
    """A row of the fleet page: a device's stats and its online strip."""
    device_id = aggregates["device_id"]
    stats = stats_from_aggregates(aggregates)
    strip = []
    if aggregates["online_minutes"]:
        last = aggregates["last_minute"]
        first = max(aggregates["first_minute"], last - STRIP_MINUTES + 1)
        strip = [
            {"online": online, "minutes": end - start + 1,
             "first": minute_to_rfc3339(start), "last": minute_to_rfc3339(end)}
            for online, start, end in online_runs(read_online_minutes(db, device_id, first, last), first, last)
        ]
    return {
        "device_id": device_id,
        "stats_url": url_for(".get_stats", device_id=device_id),
        "has_sent": stats is not None,
        "uptime": stats["uptime"] if stats else 0.0,
        "avg_upload_time": stats["avg_upload_time"] if stats else "0s",
        "online_minutes": aggregates["online_minutes"],
        "upload_count": aggregates["upload_count"],
        "first_online": minute_to_rfc3339(aggregates["first_minute"]) if aggregates["online_minutes"] else None,
        "last_online": minute_to_rfc3339(aggregates["last_minute"]) if aggregates["online_minutes"] else None,
        "strip": strip,
        "strip_online": sum(run["minutes"] for run in strip if run["online"]),
        "strip_minutes": sum(run["minutes"] for run in strip),
    }


@bp.get("/openapi.json")
def openapi_document():
    # The servers entry names this very server, so "Try it out" works on any port.
    document = dict(current_app.extensions["fleetmon.openapi"])
    document["servers"] = [{"url": request.host_url.rstrip("/"), "description": "this fleetmon"}]
    return document


@docs_bp.get("/docs/")
def docs():
    return render_template("index.j2", openapi_spec_url=url_for("fleetmon.openapi_document"))


@bp.get("/debug/devices")
def debug_devices():
    """The listed devices in id order, a page at a time: `next` continues the list."""
    limit = int_argument("limit", 100, 1, DEBUG_PAGE_LIMIT)
    rows = read_listed_stats(get_db(), request.args.get("after", ""), limit + 1)  # one more: is there a next page?
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "devices": [
            {
                "device_id": row["device_id"],
                "has_sent": bool(row["online_minutes"] or row["upload_count"]),
                "online_minutes": row["online_minutes"],
                "upload_count": row["upload_count"],
            }
            for row in rows
        ],
        "next": url_for(".debug_devices", after=rows[-1]["device_id"], limit=limit) if more else None,
    }


@bp.get("/debug/stats/<device_id>")
def debug_stats(device_id: str):
    row = read_device_stats(get_db(), device_id)
    has_heartbeats = row["online_minutes"] > 0
    return {
        "device_id": device_id,
        "online_minutes": row["online_minutes"],
        "first_online_minute": minute_to_rfc3339(row["first_minute"]) if has_heartbeats else None,
        "last_online_minute": minute_to_rfc3339(row["last_minute"]) if has_heartbeats else None,
        "upload_count": row["upload_count"],
        "upload_total_ns": row["upload_total_ns"],
        "stats": stats_from_aggregates(row),
    }


# --- Server -------------------------------------------------------------------------


class KeepAliveTask(WSGITask):
    """waitress's task, but keeping the connection open after a 204.

    waitress 3.0.2 closes the connection after any HTTP/1.1 response without a length,
    and a 204 may not carry one, so each heartbeat would cost a new connection. A 204
    ends at its blank line (RFC 9112, section 6.3), so nothing needs closing.
    Upstream: https://github.com/Pylons/waitress/pull/502; when a release has it, this
    class goes (test_fleetmon.py tells when).
    """

    def set_close_on_finish(self) -> None:
        ends_at_blank_line = not self.has_body and self.version == "1.1" and not self.wrote_header
        client_asks_to_close = self.request.headers.get("CONNECTION", "").lower() == "close"
        if ends_at_blank_line and not client_asks_to_close:
            return
        super().set_close_on_finish()


class JsonErrorTask(ErrorTask):
    """waitress's own answer to HTTP it cannot parse, as JSON like fleetmon's other errors."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps({"msg": f"{error.reason}: {error.body}"}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class FleetmonChannel(HTTPChannel):
    task_class = KeepAliveTask
    error_task_class = JsonErrorTask


def create_server(app: Flask, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """A waitress server for app, with fleetmon's settings and channel.

    Raises OSError, leaving nothing open, if it cannot listen on host:port. (Asked to
    bind, waitress would leave its socket and worker thread behind when it cannot.)
    """
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    # With one worker thread requests queue by design; waitress would warn of every queue.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "send_bytes", DeprecationWarning)  # see WAITRESS_SETTINGS
            server = waitress.create_server(app, sockets=[listener], **WAITRESS_SETTINGS)
    except BaseException:
        listener.close()
        raise
    server.channel_class = FleetmonChannel  # where waitress lets a server choose it
    return server


# The answers the activity line counts, by the endpoint that gives them.
ACTIVITY_KINDS = {"fleetmon.post_heartbeat": "heartbeats", "fleetmon.post_stats": "uploads",
                  "fleetmon.get_stats": "stats reads"}


class Activity:
    """What the server answered, told as one line an interval, and nothing while idle."""

    def __init__(self):
        self._answers: Counter[str] = Counter()
        self._errors: Counter[int] = Counter()
        self._lock = threading.Lock()

    def count(self, response):
        """An after_request hook: count telemetry answered, and every error fleetmon
        answers (not those waitress answers itself, before fleetmon sees the request)."""
        with self._lock:
            if response.status_code >= 400:
                self._errors[response.status_code] += 1
            elif request.endpoint in ACTIVITY_KINDS:
                self._answers[ACTIVITY_KINDS[request.endpoint]] += 1
        return response

    def take_line(self, seconds: int) -> str | None:
        """The line for what was counted since the last call, or None if nothing was."""
        with self._lock:
            answers, errors = self._answers, self._errors
            self._answers, self._errors = Counter(), Counter()
        if not answers and not errors:
            return None
        parts = [f"{answers[kind]:,} {kind}" for kind in ACTIVITY_KINDS.values()]
        rejected = sum(n for status, n in errors.items() if status < 500)
        parts.append(f"{rejected:,} rejected")
        if rejected < errors.total():
            parts.append(f"{errors.total() - rejected:,} failed")
        line = f"fleetmon: last {seconds} s: " + ", ".join(parts)
        if errors:
            line += " (" + ", ".join(f"{status} x{n:,}" for status, n in sorted(errors.items())) + ")"
        return line


def report_activity(activity: Activity, stop: threading.Event) -> None:
    while not stop.wait(ACTIVITY_INTERVAL_SECONDS):
        line = activity.take_line(ACTIVITY_INTERVAL_SECONDS)
        if line:
            print(line, flush=True)


def serve(app: Flask, host: str, port: int) -> None:
    """Serve app with waitress until Ctrl+C, telling what it does."""
    try:
        server = create_server(app, host, port)
    except OSError as error:
        in_use = error.errno == errno.EADDRINUSE
        reason = "the port is in use (another fleetmon? --port chooses another)" if in_use else error.strerror
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    if hasattr(os, "sched_setaffinity"):  # Linux
        # waitress's two threads on one core hand the GIL to each other at once; on two
        # cores each waits out Python's switch interval (README.md, "Many clients at once").
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    activity = Activity()
    app.after_request(activity.count)
    stop = threading.Event()
    reporter = threading.Thread(target=report_activity, args=(activity, stop), name="fleetmon activity")
    devices = len(app.config["DEVICE_IDS"])
    url = f"http://{host}:{server.effective_port}"
    print(f"fleetmon: {devices:,} device{'s' if devices != 1 else ''} from {app.config['DEVICES_CSV'].absolute()}, "
          f"database {app.config['DATABASE'].absolute()}")
    print(f"fleetmon: listening on {url}/api/v1 (fleet page {url}/, docs {url}/docs/)", flush=True)
    reporter.start()
    try:
        server.run()  # until Ctrl+C, which it catches
    finally:
        stop.set()
        reporter.join()
        server.close()


# --- Simulator ----------------------------------------------------------------------

SIMULATED_DAY_START = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
SIMULATED_DAY_MINUTES = 480
UPLOADS_A_DAY = 100


class PublishedDay(NamedTuple):
    """What the vendor's simulator publishes for one of its devices."""

    heartbeats: int  # over a 480-minute span
    uptime: str  # as it prints it, with five decimals
    avg_upload_time: str
    mean_ns: int  # the same mean, in nanoseconds


PUBLISHED_DAYS = {
    "60-6b-44-84-dc-64": PublishedDay(479, "99.79167", "3m7.893379134s", 187_893_379_134),
    "b4-45-52-a2-f1-3c": PublishedDay(480, "100.00000", "3m19.085533836s", 199_085_533_836),
    "26-9a-66-01-33-83": PublishedDay(446, "92.91667", "3m21.858747766s", 201_858_747_766),
    "18-b8-87-e7-1f-06": PublishedDay(474, "98.75000", "3m17.331667813s", 197_331_667_813),
    "38-4e-73-e0-33-59": PublishedDay(479, "99.79167", "3m29.226522788s", 209_226_522_788),
}


class Telemetry(NamedTuple):
    second: float  # of the simulated day, when the device sends it
    path: str
    body: dict


def simulated_day(device_id: str, seed: int = 0) -> list[Telemetry]:
    """A day of a device's telemetry, in the order it sends it.

    The vendor's devices get a day that gives exactly its published stats; any other
    device a day drawn from the seed and its id, most steady and some flaky. Heartbeats
    come once a minute, with a few retries within a minute and a few sent out of order;
    uploads about every five minutes.
    """
    random = Random(f"{seed}:{device_id}")
    published = PUBLISHED_DAYS.get(device_id)
    if published:
        missed = random.sample(range(1, SIMULATED_DAY_MINUTES), SIMULATED_DAY_MINUTES + 1 - published.heartbeats)
        mean, spread = published.mean_ns, 7_919_113
        # Half above the mean and half below, plus 99 ns: truncating division gives the
        # mean, rounding would give one more.
        uploads = [mean + sign * step * spread for step in range(UPLOADS_A_DAY // 2) for sign in (1, -1)]
        uploads[0] += 99
    else:
        miss_rate = random.choice([0.002, 0.005, 0.01, 0.01, 0.02, random.uniform(0.05, 0.3)])
        missed = [m for m in range(1, SIMULATED_DAY_MINUTES) if random.random() < miss_rate]
        mean = random.randint(60, 300) * 10**9
        uploads = [max(0, int(random.gauss(mean, mean / 5))) for _ in range(UPLOADS_A_DAY)]

    telemetry = []
    for minute in sorted(set(range(SIMULATED_DAY_MINUTES + 1)) - set(missed)):
        second = minute * 60 + random.uniform(0, 50)
        telemetry.append(Telemetry(second, f"/api/v1/devices/{device_id}/heartbeat", {"sent_at": None}))
        if random.random() < 0.02:  # a retry, later in the same minute
            telemetry.append(Telemetry(second + 5, telemetry[-1].path, {"sent_at": None}))
    for number, upload_time in enumerate(uploads):
        second = number * SIMULATED_DAY_MINUTES * 60 / len(uploads) + random.uniform(0, 200)
        telemetry.append(Telemetry(second, f"/api/v1/devices/{device_id}/stats", {"upload_time": upload_time}))
    telemetry.sort(key=lambda event: event.second)
    for event in telemetry:
        event.body["sent_at"] = rfc3339(SIMULATED_DAY_START + timedelta(seconds=event.second))
    for index in random.sample(range(len(telemetry) - 1), len(telemetry) // 100):
        telemetry[index], telemetry[index + 1] = telemetry[index + 1], telemetry[index]  # out of order
    return telemetry


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SimulatorError(Exception):
    """A problem that stops the simulator, told in one line."""


class Simulation:
    """Clients that send the simulated days of a fleet to a running fleetmon, in parallel."""

    MAX_CLIENTS = 16

    def __init__(self, url: str, device_ids: Iterable[str], seed: int, pace: float):
        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError:  # a port that is no number, or past 65535
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None:
            raise SimulatorError(f"--url must be an http:// URL with a valid port, not {url!r}")
        self.url, self.host, self.port = url, parts.hostname, port
        self.device_ids = sorted(device_ids)
        # Of the devices not the vendor's, the first sends nothing: a fleet has its silent one.
        self.silent = min(set(self.device_ids) - set(PUBLISHED_DAYS), default=None)
        self.seed, self.pace = seed, pace
        self.total = self.sent = self.failed = 0
        self.started = time.monotonic()
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def connection(self) -> HTTPConnection:
        return HTTPConnection(self.host, self.port, timeout=30)

    def check_fleetmon_answers(self) -> None:
        try:
            with closing(self.connection()) as connection:
                connection.request("GET", "/", headers={"Accept": "application/json"})
                response = connection.getresponse()
                body = response.read()
        except OSError as error:
            raise SimulatorError(f"nothing answers at {self.url} ({error}); is fleetmon running?") from None
        try:
            is_fleetmon = json.loads(body).get("name") == "fleetmon"
        except (ValueError, AttributeError):
            is_fleetmon = False
        if response.status != 200 or not is_fleetmon:
            raise SimulatorError(f"{self.url} answers, but not as fleetmon (HTTP {response.status})")

    def run(self) -> None:
        """Send every device's day, each client its share of devices in time order."""
        days = {device_id: simulated_day(device_id, self.seed) if device_id != self.silent else []
                for device_id in self.device_ids}
        self.total = sum(map(len, days.values()))
        clients = min(len(self.device_ids), self.MAX_CLIENTS)
        # merge() keeps each day's own order, out-of-order sends included.
        shares = [list(merge(*(days[device_id] for device_id in self.device_ids[i::clients]),
                             key=lambda event: event.second))
                  for i in range(clients)]
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.send, args=(share,)) for share in shares]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
                    self.show_progress()
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
        self.show_progress(end="\n")

    def send(self, telemetry: list[Telemetry]) -> None:
        with closing(self.connection()) as connection:
            for event in telemetry:
                due = self.started + event.second / (SIMULATED_DAY_MINUTES * 60) * self.pace
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                status = self.post(connection, event)
                with self._lock:
                    self.sent += 1
                    self.failed += status != 204

    @staticmethod
    def post(connection: HTTPConnection, event: Telemetry) -> int:
        """POST one event: its status, or 0 if it got no answer.

        A heartbeat is sent once more, on a fresh connection, if the server had closed the
        connection (an idle one, say): a heartbeat counts once however often it comes. An
        upload is not: it may have been stored before the connection broke.
        """
        attempts = 2 if event.path.endswith("/heartbeat") else 1
        for _ in range(attempts):
            try:
                connection.request("POST", event.path, body=json.dumps(event.body),
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                return response.status
            except (OSError, http.client.HTTPException):
                connection.close()
        return 0

    def show_progress(self, end: str = "") -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        print(f"\rsimulate: {self.sent:,} of {self.total:,} requests sent, {self.failed:,} failed, "
              f"{self.sent / elapsed:,.0f} requests/s", end=end, file=sys.stderr, flush=True)

    def results(self) -> list[tuple[str, str, str, str]]:
        """(device, uptime, average upload time, verdict) for every device; the vendor's
        simulator's table, with expected against actual for its own devices."""
        table = []
        with closing(self.connection()) as connection:
            for device_id in self.device_ids:
                connection.request("GET", f"/api/v1/devices/{device_id}/stats")
                response = connection.getresponse()
                body = response.read()
                stats = json.loads(body) if response.status == 200 else None
                uptime = f"{stats['uptime']:.5f}" if stats else "-"
                average = stats["avg_upload_time"] if stats else "-"
                verdict = ""
                published = PUBLISHED_DAYS.get(device_id)
                if published:
                    expected = (published.uptime, published.avg_upload_time)
                    verdict = "PASS" if (uptime, average) == expected else f"FAIL, expected {' '.join(expected)}"
                table.append((device_id, uptime, average, verdict))
        return table


def simulate(args: argparse.Namespace) -> int:
    """`python fleetmon.py simulate`: the exit status."""
    simulation = Simulation(args.url.rstrip("/"), load_device_ids(args.devices), args.seed, args.pace)
    simulation.check_fleetmon_answers()
    try:
        simulation.run()
    except KeyboardInterrupt:
        print(f"\nsimulate: stopped; {simulation.sent:,} requests sent, {simulation.failed:,} failed", file=sys.stderr)
        return 1
    try:
        table = simulation.results()
    except (OSError, http.client.HTTPException) as error:
        raise SimulatorError(f"{simulation.url} stopped answering before the results were read ({error})") from None
    print(f"{'device_id':<20} {'uptime':>10}  {'avg_upload_time':<18} check")
    for device_id, uptime, average, verdict in table:
        print(f"{device_id:<20} {uptime:>10}  {average:<18} {verdict}".rstrip())
    checks = [verdict for *_, verdict in table if verdict]
    passed = checks.count("PASS")
    print(f"simulate: {simulation.sent:,} requests sent, {simulation.failed:,} failed; "
          f"{passed} of {len(checks)} published results match")
    all_sent = simulation.sent == simulation.total and simulation.failed == 0
    return 0 if all_sent and passed == len(checks) else 1


# --- Entry point --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetmon.py", description="Serve fleetmon with waitress.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--devices", type=Path, default=DEFAULT_DEVICES_CSV, help="devices CSV (default: beside fleetmon.py)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DATABASE, help="SQLite database (default: beside fleetmon.py)")
    commands = parser.add_subparsers(dest="command", title="commands")
    simulator = commands.add_parser("simulate", help="send a simulated day of telemetry to a running fleetmon")
    simulator.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="fleetmon's address (default %(default)s)")
    # SUPPRESS: given before `simulate` or after it, --devices is the same option.
    simulator.add_argument("--devices", type=Path, default=argparse.SUPPRESS, help="devices CSV (default: beside fleetmon.py)")
    simulator.add_argument("--seed", type=int, default=0, help="draws the days of devices other than the vendor's (default %(default)s)")
    simulator.add_argument("--pace", type=float, default=0.0, metavar="SECONDS",
                           help="spread the day over this long (default: as fast as it goes)")
    args = parser.parse_args(argv)

    if args.command == "simulate":
        try:
            return simulate(args)
        except (StartupError, SimulatorError) as error:
            print(f"simulate: {error}", file=sys.stderr)
            return 2
    if not 0 <= args.port <= 65535:
        print(f"fleetmon: port {args.port} is outside 0-65535", file=sys.stderr)
        return 1
    try:
        app = create_app(database=args.db, devices_csv=args.devices)
        try:
            serve(app, args.host, args.port)
        finally:
            close_storage(app)
    except StartupError as error:
        print(f"fleetmon: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
