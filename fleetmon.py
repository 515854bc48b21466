"""fleetmon: uptime and average upload time for a fleet of edge devices.

Devices post a heartbeat every minute and, after each video upload, how long it took.
fleetmon keeps both in SQLite and answers, per device, its uptime and its mean upload
time, exactly as the vendor's device simulator computes them. That is the contract, and
this module tells it first: settings, the maths, storage, the three views, and serving
them on waitress. The rest follows, marked as such: knowing which devices are down and
saying so, the fleet and device pages, metrics, retention, the debug views and the docs.

    python fleetmon.py             serve (see --help)
    python simulator.py            drive it with the vendor's simulated day

``flask --app fleetmon run`` works too, for development.
"""

import argparse
import csv
import errno
import gc
import http.client
import json
import logging
import math
import re
import socket
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Iterator
from contextlib import ExitStack, closing, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import prometheus_client
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from swagger_ui_bundle import swagger_ui_path
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, WSGITask
from werkzeug.exceptions import Conflict, HTTPException, InternalServerError

# --- Settings -------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
DEFAULT_DEVICES_CSV = HERE / "devices.csv"
DEFAULT_DATABASE = HERE / "fleetmon.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6733
# A device beats once a minute: five missed beats in a row is an outage, not a hiccup.
DEFAULT_DOWN_AFTER_SECONDS = 5 * 60

MAX_BODY_BYTES = 64 * 1024
INT64_MAX = 2**63 - 1
# Python will not turn a longer run of digits into an int (sys.get_int_max_str_digits).
MAX_INTEGER_DIGITS = 4300


class StartupError(Exception):
    """A problem that stops fleetmon from starting, told in one line."""


# --- The maths: time, uptime, durations -----------------------------------------------

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MINUTE = timedelta(minutes=1)
FIRST_MINUTE = (datetime(1, 1, 1, tzinfo=UTC) - UNIX_EPOCH) // ONE_MINUTE  # the earliest a sent_at can be
# RFC 3339 section 5.6, with an explicit offset and at most nanosecond precision.
# Dates and times are range-checked by datetime, the offset here.
RFC3339_DATE_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d{1,9})?(?:Z|([+-])([01]\d|2[0-3]):([0-5]\d))",
    re.ASCII,
)


def utc_datetime(sent_at: str) -> datetime:
    """An RFC 3339 date-time with an explicit offset, in UTC, to the whole second.

    Raises ValueError for anything else, or for a time outside years 1-9999 in UTC.
    """
    match = RFC3339_DATE_TIME.fullmatch(sent_at)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time with an offset: {sent_at!r}")
    year, month, day, hour, minute, second, sign, offset_hours, offset_minutes = match.groups()
    offset = timedelta(hours=int(offset_hours or 0), minutes=int(offset_minutes or 0))
    if sign == "-":
        offset = -offset
    local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone(offset))
    try:
        return local.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"outside years 1-9999 in UTC: {sent_at!r}") from None


def minute_of(moment: datetime) -> int:
    """The minute that contains a moment, in minutes since the Unix epoch."""
    return (moment - UNIX_EPOCH) // ONE_MINUTE


def utc_minute(sent_at: str) -> int:
    """The UTC minute that contains an RFC 3339 date-time, in minutes since the Unix
    epoch: the seconds and their fraction dropped. Raises ValueError as utc_datetime."""
    return minute_of(utc_datetime(sent_at))


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


class Aggregates(NamedTuple):
    """What fleetmon keeps per device for its stats, whatever the history's length."""

    online_minutes: int
    first_minute: int | None
    last_minute: int | None
    upload_count: int
    upload_total_ns: int


def device_stats(aggregates: Aggregates) -> dict | None:
    """GET stats' answer from a device's aggregates; None while it has sent nothing."""
    if aggregates.online_minutes == 0 and aggregates.upload_count == 0:
        return None
    return {
        "uptime": uptime_percent(aggregates.online_minutes, aggregates.first_minute, aggregates.last_minute),
        "avg_upload_time": format_duration(mean_ns(aggregates.upload_total_ns, aggregates.upload_count)),
    }


# --- The devices file -----------------------------------------------------------------


def load_device_ids(path: Path) -> frozenset[str]:
    """Read the ids under the ``device_id`` column of a CSV file.

    Tolerates what spreadsheets write: a UTF-8 byte-order mark, spaces around values,
    blank lines and repeated ids. Refuses a file that lists no device, and an id that
    no URL can reach: one with a '/', or '.' and '..', which browsers resolve away.
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
        if "/" in device_id or device_id in (".", ".."):
            raise StartupError(f"devices file {path}, line {line}: no URL can carry the device id {device_id!r}")
        if device_id:
            device_ids.add(device_id)
    if not device_ids:
        raise StartupError(f"devices file {path} lists no devices under device_id")
    return frozenset(device_ids)


# --- Storage --------------------------------------------------------------------------

SCHEMA_VERSION = 2
MIGRATIONS = HERE / "migrations"
# How long a statement waits for another connection's write lock before it fails. A
# write holds it for microseconds, a checkpoint or a pruning step for milliseconds.
BUSY_TIMEOUT_SECONDS = 10
# The write-ahead log is cut back to this size whenever a checkpoint empties it, so that
# a burst (or a full disk that held checkpoints back) does not leave it large for good.
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
# Connections kept open between requests; more than waitress's worker threads, so that
# `flask run`, with a thread a request, reuses them too.
IDLE_CONNECTIONS_KEPT = 8


def connect(database: Path) -> sqlite3.Connection:
    # Autocommit: a statement outside an explicit transaction is committed before
    # execute() returns; writes of more than one statement use transaction() below.
    # check_same_thread=False: the pool lends a connection to one request at a time,
    # whichever thread serves it.
    db = sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    try:
        # In WAL mode, NORMAL still makes every commit survive the process being killed;
        # only a power cut or an OS crash can take back the last few.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        db.execute("PRAGMA temp_store = MEMORY")
    except sqlite3.Error:  # a file that is not a database, say
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """All or nothing. IMMEDIATE takes the write lock at once: a transaction that read
    first and then asked for it could be refused at once when another holds it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a failed COMMIT (a full disk) can leave it open
            db.execute("ROLLBACK")
        raise


def schema_version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def upgrade(db: sqlite3.Connection, database: Path, schema: str) -> str | None:
    """Bring a database written by an earlier fleetmon to SCHEMA_VERSION: each step the
    SQL of migrations/N.sql, then schema (schema.sql) for what the steps leave to it, all
    in one transaction, so that no one sees a step without the rest. Returns a line to
    tell, if it did."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise StartupError(f"database {database} was written by a newer fleetmon (schema version {version}, "
                           f"this one knows up to {SCHEMA_VERSION}); it is left as it was")
    # Version 0 is the first layout, or a database that schema.sql is about to make.
    is_new = version == 0 and not db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'heartbeat_minutes'").fetchone()
    if version == SCHEMA_VERSION or is_new:
        return None
    started, changes_before = time.monotonic(), db.total_changes
    try:
        with transaction(db):
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in split_statements((MIGRATIONS / f"{step}.sql").read_text(encoding="utf-8")):
                    db.execute(statement)
            # Its PRAGMAs change nothing here: an earlier fleetmon's database is in WAL mode.
            for statement in split_statements(schema):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as error:
        raise StartupError(f"cannot upgrade database {database} from schema version {version}: {error}; "
                           "it is left as it was") from None
    return (f"upgraded database {database} from schema version {version} to {SCHEMA_VERSION}: "
            f"{db.total_changes - changes_before:,} rows written in {time.monotonic() - started:.1f} s")


def split_statements(script: str) -> list[str]:
    """An SQL script's statements, one by one: executescript() would commit first."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    return statements


def init_storage(app: Flask, device_ids: frozenset[str]) -> None:
    """Upgrade the database if it is an old one, apply schema.sql, give every device of
    the devices file its row, and give the app its connections and DEVICE_KEYS: the
    devices file's ids, each with its key."""
    database = app.config["DATABASE"]
    if not database.parent.is_dir():
        raise StartupError(f"cannot use database {database}: there is no folder {database.parent}")
    try:
        with app.open_resource("schema.sql") as file:
            schema = file.read().decode("utf-8")
        with closing(connect(database)) as db:
            app.config["UPGRADED"] = upgrade(db, database, schema)
            db.executescript(schema)  # what a new database is made of; an upgraded one has it
            if schema_version(db) == 0:  # a new database
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            with transaction(db):
                # Writes nothing for devices it has, so a start needs no free disk space.
                db.executemany("INSERT INTO devices (device_id) VALUES (?) ON CONFLICT (device_id) DO NOTHING",
                               ((device_id,) for device_id in sorted(device_ids)))
            # Writes name a device by its key: an integer lookup, not its text id's index.
            app.config["DEVICE_KEYS"] = {row["device_id"]: row["device_key"]
                                         for row in db.execute("SELECT device_key, device_id FROM devices")
                                         if row["device_id"] in device_ids}
    except sqlite3.Error as error:
        raise StartupError(f"cannot use database {database}: {error}") from None
    app.extensions["fleetmon.pool"] = ConnectionPool(database, list(app.config["DEVICE_KEYS"].values()))
    app.teardown_appcontext(release_db)


class ConnectionPool:
    """Open connections to one database, each lent to one request at a time.

    Each knows, in its temporary table `listed`, the devices of this process's devices
    file: what the fleet's pages and lists show, even while another fleetmon with
    another devices file shares the database.
    """

    def __init__(self, database: Path, listed_keys: list[int]):
        self.database = database
        self.listed_keys = listed_keys
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def borrow(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        db = connect(self.database)
        try:
            db.execute("CREATE TEMP TABLE listed (device_key INTEGER PRIMARY KEY)")
            db.execute("BEGIN")  # not IMMEDIATE: a temporary table takes no lock on the database
            db.executemany("INSERT INTO temp.listed VALUES (?)", ((key,) for key in self.listed_keys))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

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


def close_storage(app: Flask) -> None:
    """Close the app's idle connections: the end of its life (a test's, the server's)."""
    app.extensions["fleetmon.pool"].close()


def get_db() -> sqlite3.Connection:
    """The connection this request uses, borrowed from the app's pool."""
    if "db" not in g:
        g.db = current_app.extensions["fleetmon.pool"].borrow()
    return g.db


def release_db(error: BaseException | None) -> None:
    """Give the request's connection back to the pool."""
    db = g.pop("db", None)
    if db is not None:
        current_app.extensions["fleetmon.pool"].give_back(db)


def discard_db() -> None:
    """Close the request's connection instead: after a database error the next request
    starts afresh (once a full disk is freed, or a read-only file made writable)."""
    db = g.pop("db", None)
    if db is not None:
        db.close()


def store(db: sqlite3.Connection, insert: str, arguments: tuple, device_key: int) -> None:
    """Store telemetry with one INSERT into a view of schema.sql, whose trigger refuses
    what must not be stored: telemetry from before the device's kept history (it may be
    pruned already, and would count twice) and an upload that would overflow its total."""
    try:
        db.execute(insert, arguments)
    except sqlite3.IntegrityError as error:
        if str(error) == "before the kept history":
            kept_from = db.execute("SELECT kept_from FROM devices WHERE device_key = ?", (device_key,)).fetchone()[0]
            raise Conflict(f"sent_at is before {minute_to_rfc3339(kept_from)}, where this device's kept history "
                           "begins (older telemetry is pruned); nothing was stored") from None
        if str(error) == "the total would overflow":
            raise Conflict(f"this upload_time would overflow the device's total upload time ({INT64_MAX} ns); "
                           "nothing was stored") from None
        raise


def record_heartbeat(db: sqlite3.Connection, device_key: int, minute: int, heard_at_ms: int) -> None:
    """Set the minute's bit in its hour's row and, if it was not set, count it."""
    hour, minute_of_hour = divmod(minute, 60)
    store(db, "INSERT INTO heartbeats VALUES (?, ?, ?, ?, ?)",
          (device_key, minute, hour, 1 << minute_of_hour, heard_at_ms), device_key)


def record_upload(db: sqlite3.Connection, device_key: int, sent_at: datetime, upload_time_ns: int,
                  heard_at_ms: int) -> None:
    """Store one upload, its sent_at in whole UTC seconds, and add it to the device's total."""
    minute = minute_of(sent_at)
    store(db, "INSERT INTO upload_reports VALUES (?, ?, ?, ?, ?)",
          (device_key, minute, int(sent_at.timestamp()), upload_time_ns, heard_at_ms), device_key)


def read_device(db: sqlite3.Connection, device_id: str) -> sqlite3.Row:
    return db.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()


def aggregates_of(device: sqlite3.Row) -> Aggregates:
    return Aggregates(*(device[field] for field in Aggregates._fields))


# --- The contract: three views --------------------------------------------------------

api = Blueprint("api", __name__)


@api.app_errorhandler(HTTPException)
def error_as_json(error: HTTPException):
    """Every error, Flask's own 404, 405, 413 and 500 included, as {"msg": ...}."""
    response = error.get_response()  # keeps headers such as Allow on a 405
    response.set_data(current_app.json.dumps({"msg": error.description}))
    response.content_type = "application/json"
    return response


@api.app_errorhandler(Exception)
def unexpected_error(error: Exception):
    """A 500 with no details in the body, and one line in the log: the traceback only
    the first time an error of its kind comes (a full disk fails every request alike)."""
    kind = f"{type(error).__name__}: {error}"
    seen = current_app.extensions["fleetmon.errors_seen"]
    current_app.logger.error("%s %s failed: %s", request.method, request.path, kind,
                             exc_info=error if kind not in seen else None)
    seen.add(kind)
    if isinstance(error, sqlite3.Error):
        discard_db()
    return error_as_json(InternalServerError())


@api.app_url_value_preprocessor
def require_known_device(endpoint: str | None, values: dict | None) -> None:
    """Every route with a device_id, here and in the rest, answers 404 for a device not
    in the devices file, whatever the method (OPTIONS too) and the body. A wrong method
    is found before, and leaves no values."""
    if values and "device_id" in values and values["device_id"] not in current_app.config["DEVICE_KEYS"]:
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
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InvalidBody(f"body has an integer of more than {MAX_INTEGER_DIGITS} digits")
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


def sent_at_field(body: dict) -> datetime:
    """Validate body["sent_at"] and return it in UTC."""
    if "sent_at" not in body:
        abort(400, "sent_at is required")
    message = "sent_at must be an RFC 3339 date-time with an offset, like 2024-01-01T10:04:00Z"
    if not isinstance(body["sent_at"], str):
        abort(400, message)
    try:
        return utc_datetime(body["sent_at"])
    except ValueError:
        abort(400, message)


def upload_time_field(body: dict) -> int:
    """Validate body["upload_time"] and return it."""
    if "upload_time" not in body:
        abort(400, "upload_time is required")
    value = body["upload_time"]
    # type() rather than isinstance(): JSON true arrives as a bool, which is an int.
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        abort(400, f"upload_time must be an integer number of nanoseconds from 0 to {INT64_MAX}")
    return value


def now_ms() -> int:
    """fleetmon's own wall clock, which says when it heard a device."""
    return time.time_ns() // 1_000_000


def tell_heard(device_id: str, heard_at_ms: int) -> None:
    """Tell whoever listens (the watch on who is down, when serving) that a device was heard."""
    for listener in current_app.extensions["fleetmon.heard"]:
        listener(device_id, heard_at_ms)


@api.post("/api/v1/devices/<device_id>/heartbeat")
def post_heartbeat(device_id: str):
    minute = minute_of(sent_at_field(json_object_body()))
    heard_at = now_ms()
    record_heartbeat(get_db(), current_app.config["DEVICE_KEYS"][device_id], minute, heard_at)
    tell_heard(device_id, heard_at)
    return no_content()


@api.post("/api/v1/devices/<device_id>/stats")
def post_stats(device_id: str):
    body = json_object_body()
    sent_at = sent_at_field(body)  # validated like a heartbeat's, but no heartbeat
    upload_time = upload_time_field(body)
    heard_at = now_ms()
    record_upload(get_db(), current_app.config["DEVICE_KEYS"][device_id], sent_at, upload_time, heard_at)
    tell_heard(device_id, heard_at)
    return no_content()


@api.get("/api/v1/devices/<device_id>/stats")
def get_stats(device_id: str):
    stats = device_stats(aggregates_of(read_device(get_db(), device_id)))
    if stats is None:
        return no_content()
    return stats


# --- Serving on waitress --------------------------------------------------------------

# How waitress serves fleetmon (README.md, "How it works", says why):
WAITRESS_SETTINGS = {
    # Python runs one thread at a time and SQLite takes one writer at a time, so more
    # worker threads only add hand-offs. Slow clients hold no worker: waitress reads and
    # writes sockets in a thread of its own.
    "threads": 1,
    # Enough for hundreds of idle or slow clients while staying under the 512 sockets
    # that select() can watch on Windows.
    "connection_limit": 450,
    # Drop a connection that has sent nothing for this long between requests. Checked
    # every second, because the same check enforces REQUEST_SECONDS.
    "channel_timeout": 15,
    "cleanup_interval": 1,
    # The socket thread sends a response of up to this many bytes, not the worker: a
    # worker sending for itself leaves the socket thread spinning on the channel's lock,
    # holding the GIL, and throughput with many clients collapses (benchmark.py shows
    # it). waitress has deprecated the setting but still honours it.
    "send_bytes": 18_000,
    # Refuse a larger body from its Content-Length, before reading it. waitress refuses
    # a length equal to its limit too, hence the one byte more.
    "max_request_body_size": MAX_BODY_BYTES + 1,
}


class KeepAliveTask(WSGITask):
    """waitress's task, but keeping the connection open after a 204.

    waitress closes the connection after any HTTP/1.1 response without a length, and a
    204 may not carry one, so each heartbeat would cost a new connection. A 204 ends at
    its blank line (RFC 9112, section 6.3), so nothing needs closing.
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


# A device sends its whole request, head and body, at once. A client that trickles one
# holds a connection slot all the while (each byte resets channel_timeout), so a request
# must arrive in full within this time of its first byte.
REQUEST_SECONDS = 10


def _request_timeout_response() -> bytes:
    body = json.dumps({"msg": f"Request Timeout: the request did not arrive within {REQUEST_SECONDS} s"}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


REQUEST_TIMEOUT_RESPONSE = _request_timeout_response()


class FleetmonChannel(HTTPChannel):
    """waitress's channel, knowing when the request it is reading began to arrive."""

    task_class = KeepAliveTask
    error_task_class = JsonErrorTask
    request_began: float | None = None  # None while no request is being read
    timed_request = None  # the request whose beginning that is

    def reading_request(self) -> bool:
        request = self.request
        # Blank lines before a request are allowed (RFC 9112, section 2.2) and begin none.
        return request is not None and bool(request.headers_finished or request.header_plus.strip())

    def received(self, data: bytes) -> bool:
        # Runs in the socket thread only, as the server's checks do.
        result = super().received(data)
        if not self.reading_request():
            self.request_began = self.timed_request = None
        elif self.request is not self.timed_request:  # a request began in this data
            self.request_began = self.last_activity  # when handle_read() got the data
            self.timed_request = self.request
        return result

    def between_requests(self) -> bool:
        """Nothing being read, queued, run or written: closing it loses no request."""
        return not self.reading_request() and not self.requests and not self.total_outbufs_len

    def request_waiting(self) -> bool:
        """Whether bytes have come that the channel has yet to read: a request, perhaps."""
        try:
            return self.socket.recv(1, socket.MSG_PEEK) != b""  # b"": the client has gone
        except OSError:  # BlockingIOError when nothing has come
            return False

    def time_out_request(self) -> None:
        """Answer 408 to the request being read, and close once that is sent."""
        with self.outbuf_lock:  # as waitress's send_continue() writes
            self.outbufs[-1].append(REQUEST_TIMEOUT_RESPONSE)
            self.current_outbuf_count += len(REQUEST_TIMEOUT_RESPONSE)
            self.total_outbufs_len += len(REQUEST_TIMEOUT_RESPONSE)
        self.close_when_flushed = True  # and reads no more
        self.request_began = None


class FleetmonServer(TcpWSGIServer):
    """waitress's server, with REQUEST_SECONDS, and at the connection limit making room
    for a new client by closing the connection idle the longest, as nginx does."""

    channel_class = FleetmonChannel

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # channel_timeout
        for channel in self.active_channels.values():
            if channel.request_began is None:
                continue
            if channel.requests or channel.total_outbufs_len:
                # A pipelined request waits on the server, which reads no more of it
                # until it has answered the ones before: its time starts again.
                channel.request_began = now
            elif now - channel.request_began > REQUEST_SECONDS:
                channel.time_out_request()

    def has_room(self) -> bool:
        return len(self._map) < self.adj.connection_limit  # as waitress counts

    def channel_to_shed(self) -> FleetmonChannel | None:
        """The channel idle the longest, of those with nothing come for them to read:
        a client's request may be waiting for the socket thread to read it, even that
        of a client just accepted, before its first read."""
        idle = [channel for channel in self.active_channels.values() if channel.between_requests()]
        idle.sort(key=attrgetter("last_activity"))
        return next((channel for channel in idle if not channel.request_waiting()), None)

    def readable(self) -> bool:
        # waitress's, but at the limit it still accepts while a connection can be shed.
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        full = not self.has_room() and not any(c.between_requests() for c in self.active_channels.values())
        if full != self.in_connection_overflow:
            self.in_connection_overflow = full
            if full:
                self.logger.warning("every connection is busy at the connection limit: new ones wait")
        return not full

    def handle_accept(self) -> None:
        if self.has_room():
            super().handle_accept()
            return
        idlest = self.channel_to_shed()
        if idlest is None:
            return  # the client waits in the listen queue, as with waitress
        # Accept first: closed first, the idle channel's descriptor could go to the new
        # socket, and an event select() reported for the old socket be handled as the
        # new one's.
        connections = len(self._map)
        super().handle_accept()
        if len(self._map) > connections:  # accepted
            idlest.handle_close()


def create_server(app: Flask, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **settings):
    """A waitress server for app, with fleetmon's settings (or these) and channel.

    Raises OSError, leaving nothing open, if it cannot listen on host:port. (Asked to
    bind, waitress would leave its socket and worker thread behind when it cannot.)
    """
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    # With one worker thread requests queue by design; waitress would warn of every queue.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "send_bytes", DeprecationWarning)  # see WAITRESS_SETTINGS
            adj = Adjustments(sockets=[listener], **(WAITRESS_SETTINGS | settings))
        # What waitress.create_server() does with a socket it is given, but with our class.
        sockinfo = (listener.family, listener.type, listener.proto, listener.getsockname())
        return FleetmonServer(app, _sock=listener, bind_socket=False, adj=adj, sockinfo=sockinfo)
    except BaseException:
        listener.close()
        raise


# === The rest =========================================================================
# Everything above is the contract. Below: what operators of a real fleet need around it.

# --- Who is down: status, outages, alerts ---------------------------------------------
#
# A device is heard when fleetmon accepts its telemetry, by fleetmon's own clock: its
# sent_at may be late, replayed or wrong. Deadlines are elapsed time (time.monotonic(),
# which no clock change moves); what a person reads is the wall clock (now_ms()).

STATUS_CHECK_SECONDS = 0.5


def rfc3339_ms(ms: int) -> str:
    return (UNIX_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def short_duration(ms: int) -> str:
    """An elapsed time as a person says it, to the second: 45s, 5m, 7m12s, 2h5m, 3d4h."""
    seconds = max(0, ms) // 1000
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            return f"{whole}{unit}{rest // smaller_size}{smaller}" if rest // smaller_size else f"{whole}{unit}"
    return f"{seconds}s"


def alert_text(device_id: str, status: str, at_ms: int, last_heard_ms: int) -> str:
    """The line a change of status prints in the server window and sends as `text`."""
    if status == "down":
        clock = rfc3339_ms(last_heard_ms)[11:19]
        return f"fleetmon: {device_id} is down (last heard {clock} UTC, {short_duration(at_ms - last_heard_ms)} ago)"
    return f"fleetmon: {device_id} is up again after {short_duration(at_ms - last_heard_ms)}"


def mark_down(db: sqlite3.Connection, device_id: str, last_heard_ms: int, at_ms: int) -> bool:
    """Declare a device down, unless it was heard again since last_heard_ms: its outage
    starts when it was last heard, and the change is queued as an alert in the same
    transaction. False if it was heard meanwhile."""
    with transaction(db):
        changed = db.execute(
            "UPDATE devices SET down_since_ms = last_heard_ms"
            " WHERE device_id = ? AND last_heard_ms = ? AND down_since_ms IS NULL RETURNING device_key",
            (device_id, last_heard_ms),
        ).fetchall()
        if not changed:
            return False
        device_key = changed[0]["device_key"]
        db.execute("INSERT INTO outages (device_key, started_ms) VALUES (?, ?)", (device_key, last_heard_ms))
        db.execute("INSERT INTO alerts (device_key, status, at_ms, last_heard_ms) VALUES (?, 'down', ?, ?)",
                   (device_key, at_ms, last_heard_ms))
    return True


class Watch:
    """Who is due to be declared down, soonest first, and the server window's line for
    each change of status.

    Devices in the order they were last heard: the first is the one whose deadline comes
    first, so a check reads only the devices that are overdue, whatever the fleet's size,
    and hearing a device costs a move to the end. After a start, every device that was
    up is given the down-after time from then: fleetmon's own downtime is not theirs.
    """

    def __init__(self, db: sqlite3.Connection, down_after_seconds: float, started: float, listed: Container[str],
                 announce=print):
        self.down_after = down_after_seconds
        self.announce = announce
        self.wake_delivery = threading.Event()
        self._due: OrderedDict[str, tuple[float, int]] = OrderedDict()  # device_id: (heard, heard_at_ms)
        self._lock = threading.Lock()
        for row in db.execute("SELECT device_id, last_heard_ms FROM devices"
                              " WHERE last_heard_ms IS NOT NULL AND down_since_ms IS NULL ORDER BY last_heard_ms"):
            if row["device_id"] in listed:  # a device dropped from the file is heard no more
                self._due[row["device_id"]] = (started, row["last_heard_ms"])
        self.announced = db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]

    def heard(self, device_id: str, heard_at_ms: int, monotonic_now: float | None = None) -> None:
        """A listener of tell_heard(): runs in the request, after its commit."""
        with self._lock:
            self._due[device_id] = (time.monotonic() if monotonic_now is None else monotonic_now, heard_at_ms)
            self._due.move_to_end(device_id)

    def check(self, db: sqlite3.Connection, monotonic_now: float, now: int) -> int:
        """Declare down every device not heard for down_after, and tell every change
        since the last check (those of requests too: a device up again); returns how
        many it declared down."""
        with self._lock:
            overdue = []
            while self._due:
                device_id, (heard_at, heard_at_ms) = next(iter(self._due.items()))
                if heard_at + self.down_after > monotonic_now:
                    break
                del self._due[device_id]
                overdue.append((device_id, heard_at_ms))
        declared = 0
        for number, (device_id, heard_at_ms) in enumerate(overdue):
            try:
                declared += mark_down(db, device_id, heard_at_ms, now)
            except sqlite3.Error:
                with self._lock:  # due again at the next check, first in line, unless heard meanwhile
                    for overdue_id, at_ms in reversed(overdue[number:]):
                        if overdue_id not in self._due:
                            self._due[overdue_id] = (monotonic_now - self.down_after, at_ms)
                            self._due.move_to_end(overdue_id, last=False)
                raise
        changes = db.execute("SELECT alerts.*, device_id FROM alerts JOIN devices USING (device_key)"
                             " WHERE id > ? ORDER BY id", (self.announced,)).fetchall()
        for alert in changes:
            self.announce(alert_text(alert["device_id"], alert["status"], alert["at_ms"], alert["last_heard_ms"]))
            self.announced = alert["id"]
        if changes:
            self.wake_delivery.set()
        return declared


ALERT_TIMEOUT_SECONDS = 5
ALERT_RETRY_MAX_SECONDS = 60


class AlertDelivery:
    """Sends the queued alerts to the alert URL, oldest first, at least once each.

    A failure is one line in the server window and a retry after a backoff that doubles
    up to a minute; the alerts after it wait, so a receiver sees them in order. Without
    an alert URL, an alert is delivered by having been printed.
    """

    def __init__(self, url: str | None, announce=print):
        self.url = url
        self.announce = announce
        self.retry_after = 0.0  # seconds, after a failure
        self.next_attempt = 0.0  # monotonic

    def step(self, db: sqlite3.Connection, monotonic_now: float) -> int:
        """Deliver what is queued, until a failure; returns how many were delivered."""
        if monotonic_now < self.next_attempt:
            return 0
        delivered = 0
        for alert in db.execute("SELECT alerts.*, device_id FROM alerts JOIN devices USING (device_key)"
                                " WHERE NOT delivered ORDER BY id LIMIT 100").fetchall():
            failure = self.send(alert) if self.url else None
            if failure:
                self.retry_after = min(max(1.0, 2 * self.retry_after), ALERT_RETRY_MAX_SECONDS)
                self.next_attempt = monotonic_now + self.retry_after
                self.announce(f"fleetmon: alert {alert['id']} ({alert['device_id']} {alert['status']}) not delivered "
                              f"to {self.url}: {failure}; trying again in {short_duration(int(self.retry_after * 1000))}")
                return delivered
            self.retry_after = 0.0
            db.execute("UPDATE alerts SET delivered = 1 WHERE id = ?", (alert["id"],))
            delivered += 1
        return delivered

    def send(self, alert: sqlite3.Row) -> str | None:
        """POST one alert; None if the receiver took it, else what went wrong."""
        payload = {
            "id": alert["id"],
            "device_id": alert["device_id"],
            "status": alert["status"],
            "at": rfc3339_ms(alert["at_ms"]),
            "last_heard": rfc3339_ms(alert["last_heard_ms"]),
            "outage_seconds": (alert["at_ms"] - alert["last_heard_ms"]) / 1000 if alert["status"] == "up" else None,
            "text": alert_text(alert["device_id"], alert["status"], alert["at_ms"], alert["last_heard_ms"]),
        }
        post = urllib.request.Request(self.url, data=json.dumps(payload).encode(), method="POST",
                                      headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(post, timeout=ALERT_TIMEOUT_SECONDS) as response:
                response.read(MAX_BODY_BYTES)
        except urllib.error.HTTPError as error:
            error.close()
            return f"HTTP {error.code}"
        except (OSError, http.client.HTTPException) as error:
            return str(error) or type(error).__name__
        return None


# --- Retention: pruning in small steps ------------------------------------------------
#
# With --keep-days N, raw telemetry more than N days older than the device's own newest
# minute goes: by each device's clock, so that a replayed day from long ago is not pruned
# the moment it lands, and one device with a wrong clock cannot prune another's history.
# The aggregates stay as they are, so lifetime stats never change. The kept history
# starts on a whole hour (an online_hours row is kept or pruned whole), and telemetry
# from before it is refused, so that nothing pruned can be counted twice.

PRUNE_ROWS_PER_STEP = 500


class Pruning:
    """Pruning, a few hundred rows a transaction, so that a large backlog never holds
    the write lock for long: the requests in between get it."""

    def __init__(self, keep_days: int):
        self.keep_minutes = keep_days * 24 * 60
        self.pruning: tuple[int, int] | None = None  # (device_key, kept_from) being pruned

    def step(self, db: sqlite3.Connection) -> bool:
        """Prune up to PRUNE_ROWS_PER_STEP rows; False when there was nothing to do."""
        if self.pruning is None:
            # Devices whose window has moved on by an hour or more since they were pruned.
            device = db.execute(
                "SELECT device_key, newest_minute FROM devices WHERE newest_minute IS NOT NULL"
                " AND (kept_from IS NULL OR kept_from <= newest_minute - :keep - 60) LIMIT 1",
                {"keep": self.keep_minutes},
            ).fetchone()
            if device is None:
                return False
            kept_from = max((device["newest_minute"] - self.keep_minutes) // 60 * 60, FIRST_MINUTE)
            # First the boundary, in a transaction of its own: from its commit on, telemetry
            # before it is refused, and so the rows deleted next cannot come back. It never
            # moves back (another fleetmon on the database may have moved it on).
            db.execute("UPDATE devices SET kept_from = ? WHERE device_key = ? AND (kept_from IS NULL OR kept_from < ?)",
                       (kept_from, device["device_key"], kept_from))
            self.pruning = (device["device_key"], kept_from)
        device_key, kept_from = self.pruning
        deleted = db.execute(
            "DELETE FROM online_hours WHERE device_key = :key AND hour IN"
            " (SELECT hour FROM online_hours WHERE device_key = :key AND hour < :hour LIMIT :rows)",
            {"key": device_key, "hour": kept_from // 60, "rows": PRUNE_ROWS_PER_STEP},
        ).rowcount
        deleted += db.execute(
            "DELETE FROM uploads WHERE device_key = :key AND number IN"
            " (SELECT number FROM uploads WHERE device_key = :key AND sent_at < :second LIMIT :rows)",
            {"key": device_key, "second": kept_from * 60, "rows": PRUNE_ROWS_PER_STEP - deleted},
        ).rowcount
        if deleted < PRUNE_ROWS_PER_STEP:
            self.pruning = None
        return True


# --- Background work beside the server ------------------------------------------------

CHECKPOINT_SECONDS = 5


class Housekeeping:
    """The work that runs beside the server, in two threads of its own: the watch on who
    is down and the pruning in one, alert delivery in the other (a receiver that never
    answers holds up only its own thread). Each step takes the time as an argument, so
    that the tests call the steps with the clock they choose; the threads loop them.

    The periodic checkpoint folds the write-ahead log into the database so that the log is
    reused from its start (and cut back to WAL_SIZE_LIMIT_BYTES): it stays bounded, and
    once a full disk is freed, what the log holds moves out of it at the next round.
    """

    def __init__(self, app: Flask, down_after_seconds: float, alert_url: str | None, keep_days: int | None,
                 announce=print):
        self.database = app.config["DATABASE"]
        self.stop = threading.Event()
        with ExitStack() as opened:  # closed again if the start goes no further
            try:
                self.db = opened.enter_context(closing(connect(self.database)))
                self.delivery_db = opened.enter_context(closing(connect(self.database)))
                self.watch = Watch(self.db, down_after_seconds, time.monotonic(), app.config["DEVICE_KEYS"], announce)
            except sqlite3.Error as error:  # the database is read as the server starts
                raise StartupError(f"cannot use database {self.database}: {error}") from None
            self.connections = opened.pop_all()
        self.delivery = AlertDelivery(alert_url, announce)
        self.pruning = Pruning(keep_days) if keep_days else None
        self.next_checkpoint = 0.0
        app.extensions["fleetmon.heard"].append(self.watch.heard)
        self.threads = [threading.Thread(target=self.watch_and_prune, name="fleetmon watch"),
                        threading.Thread(target=self.deliver_alerts, name="fleetmon alerts")]

    def watch_and_prune(self) -> None:
        while not self.stop.is_set():
            busy = False
            try:
                now = time.monotonic()
                self.watch.check(self.db, now, now_ms())
                if now >= self.next_checkpoint:
                    self.next_checkpoint = now + CHECKPOINT_SECONDS
                    self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                busy = self.pruning is not None and self.pruning.step(self.db)
            except Exception:  # a full disk, say: logged, and the next round tries again
                logging.getLogger(__name__).exception("housekeeping failed")
            self.stop.wait(0.005 if busy else STATUS_CHECK_SECONDS)

    def deliver_alerts(self) -> None:
        while not self.stop.is_set():
            try:
                self.delivery.step(self.delivery_db, time.monotonic())
            except Exception:
                logging.getLogger(__name__).exception("alert delivery failed")
            self.watch.wake_delivery.wait(1.0)
            self.watch.wake_delivery.clear()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        self.watch.wake_delivery.set()
        for thread in self.threads:
            if thread.is_alive():
                thread.join()
        self.connections.close()


# --- The fleet: its API, its page, a page per device ----------------------------------

LIST_LIMIT = 1000
FLEET_PAGE_ROWS = 50
MAX_FLEET_PAGE = 1_000_000
MAX_FILTER_CHARACTERS = 200
FLEET_STRIP_MINUTES = 24 * 60
DEVICE_STRIP_MINUTES = 7 * 24 * 60
# A strip is drawn in cells of at least so many minutes (a multiple of 15 dividing 60), at
# most 97 on the fleet page and 169 on a device's, however many gaps its device had; the
# page's script makes them longer where the strip is too narrow for that many.
FLEET_STRIP_CELL_MINUTES = 15
DEVICE_STRIP_CELL_MINUTES = 60
QUARTER = (1 << 15) - 1  # the minutes of a quarter hour, as bits of an hour's
OUTAGES_SHOWN = 20
# The fleet page's order, as the index devices_by_concern of schema.sql has it, so that a
# page of it is a walk along that index.
BY_CONCERN = "down_since_ms IS NULL, down_since_ms, online_minutes = 0 AND upload_count = 0, uptime, device_id"
# A filter matching at most this many devices sorts its matches; one matching more
# walks the index, where its matches are dense enough to fill a page quickly.
FILTER_SORTS_UP_TO = 2000
STATUSES = {
    "up": "last_heard_ms IS NOT NULL AND down_since_ms IS NULL",
    "down": "down_since_ms IS NOT NULL",
    "never": "last_heard_ms IS NULL",
}

fleet = Blueprint("fleet", __name__)


def int_argument(name: str, default: int, low: int, high: int) -> int:
    """A whole-number query argument from low to high."""
    text = request.args.get(name)
    if text is None:
        return default
    # The length first: Python refuses to read a very long run of digits as an int.
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high)) and low <= int(text) <= high):
        abort(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def status_of(device: sqlite3.Row) -> str:
    if device["last_heard_ms"] is None:
        return "never"
    return "down" if device["down_since_ms"] is not None else "up"


def device_view(device: sqlite3.Row) -> dict:
    """A device as the API lists it."""
    stats = device_stats(aggregates_of(device)) or {"uptime": None, "avg_upload_time": None}
    optional = {"last_heard": (rfc3339_ms, device["last_heard_ms"]),
                "down_since": (rfc3339_ms, device["down_since_ms"]),
                "history_kept_from": (minute_to_rfc3339, device["kept_from"])}
    return {
        "device_id": device["device_id"],
        "status": status_of(device),
        **{name: None if value is None else to_text(value) for name, (to_text, value) in optional.items()},
        **stats,
    }


def read_outages(db: sqlite3.Connection, device_key: int) -> list[tuple[int, int | None]]:
    """A device's latest outages, newest first: (started_ms, ended_ms, None while it lasts)."""
    return db.execute("SELECT started_ms, ended_ms FROM outages WHERE device_key = ? ORDER BY started_ms DESC LIMIT ?",
                      (device_key, OUTAGES_SHOWN)).fetchall()


def outage_view(started: int, ended: int | None) -> dict:
    """An outage as the API shows it."""
    return {"started": rfc3339_ms(started), "ended": None if ended is None else rfc3339_ms(ended),
            "seconds": None if ended is None else (ended - started) / 1000}


def listed_page(endpoint: str, condition: str = "true", **arguments) -> tuple[list[sqlite3.Row], str | None]:
    """A page of the listed devices that meet condition, in id order from the request's
    `after`, `limit` of them; and the URL of endpoint for the next page, if there is one."""
    limit = int_argument("limit", 100, 1, LIST_LIMIT)
    rows = get_db().execute(
        f"SELECT * FROM devices INDEXED BY devices_by_id WHERE device_id > ? AND device_key IN temp.listed"
        f" AND ({condition}) ORDER BY device_id LIMIT ?",
        (request.args.get("after", ""), limit + 1),  # one more: is there a next page?
    ).fetchall()
    if len(rows) <= limit:
        return rows, None
    return rows[:limit], url_for(endpoint, after=rows[limit - 1]["device_id"], limit=limit, **arguments)


@fleet.get("/api/v1/devices")
def list_devices():
    """The devices of the devices file in id order, a page at a time: `next` continues."""
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        abort(400, "status must be up, down or never")
    rows, next_url = listed_page(".list_devices", STATUSES[status] if status else "true", status=status)
    return {"devices": [device_view(row) for row in rows], "next": next_url}


@fleet.get("/api/v1/devices/<device_id>")
def get_device(device_id: str):
    db = get_db()
    device = read_device(db, device_id)
    return {**device_view(device), "outages": [outage_view(*outage) for outage in read_outages(db, device["device_key"])]}


def wants_html() -> bool:
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def negotiated(html, json_body):
    """One URL, two answers: HTML for a browser, JSON for everyone else."""
    response = current_app.make_response(html() if wants_html() else json_body())
    response.vary.add("Accept")
    return response


@fleet.get("/")
def index():
    """The fleet page for a browser; for an API client, what this server is."""
    page = int_argument("page", 1, 1, MAX_FLEET_PAGE)  # checked for both, as the document says
    text = request.args.get("q", "").strip()
    if len(text) > MAX_FILTER_CHARACTERS:  # an id is not that long; a bound on what a request asks
        abort(400, f"q must be at most {MAX_FILTER_CHARACTERS} characters")
    return negotiated(lambda: fleet_page(text, page), about_this_server)


def about_this_server() -> dict:
    device_keys = current_app.config["DEVICE_KEYS"]
    return {
        "name": "fleetmon",
        "version": current_app.extensions["fleetmon.openapi"]["info"]["version"],
        "devices": len(device_keys),
        "links": {
            "fleet_page": url_for(".index"),
            "devices": url_for(".list_devices"),
            "metrics": url_for("metrics.metrics_view"),
            "docs": url_for("docs.docs_page"),
            "openapi": url_for("docs.openapi_document"),
            "example_stats": url_for("api.get_stats", device_id=min(device_keys)),
        },
    }


# A device of this process's devices file. EXISTS rather than IN: given IN, SQLite would
# start from the listed devices, every one of them, rather than from the index at hand.
LISTED = "EXISTS (SELECT 1 FROM temp.listed WHERE listed.device_key = devices.device_key)"


# A device among a filter's matches, given as a JSON list of device keys.
MATCHED = "device_key IN (SELECT value FROM json_each(:keys))"


def count_by_status(db: sqlite3.Connection, keys: str | None = None) -> dict:
    """How many of the listed devices, or of the MATCHED keys, are up, down and never
    heard. Of the listed ones, only the few down or never heard are read, along their own
    indexes; of the matched ones, each matched row."""
    if keys is None:
        devices = len(current_app.config["DEVICE_KEYS"])
        down, never = db.execute(
            f"SELECT (SELECT count(*) FROM devices INDEXED BY devices_down WHERE down_since_ms IS NOT NULL AND {LISTED}),"
            f" (SELECT count(*) FROM devices INDEXED BY devices_never_heard WHERE last_heard_ms IS NULL AND {LISTED})"
        ).fetchone()
    else:
        devices, down, never = db.execute(
            f"SELECT count(*), count(down_since_ms), count(*) - count(last_heard_ms) FROM devices WHERE {MATCHED}",
            {"keys": keys}).fetchone()
    return {"devices": devices, "up": devices - down - never, "down": down, "never": never}


def init_fleet(app: Flask) -> None:
    # The filter searches these: the listed ids, folded once rather than on every page.
    app.config["FOLDED_IDS"] = [(device_id.casefold(), key) for device_id, key in app.config["DEVICE_KEYS"].items()]


def read_fleet_page(db: sqlite3.Connection, text: str, page: int) -> tuple[dict, int, int, list[sqlite3.Row]]:
    """The counts, the page (past the end: the last), the number of pages, and the rows
    of that page of the listed devices whose id contains text in any case, in the fleet
    page's order.

    Without a filter, a walk along the index. With one, a pass over the ids, folded in
    memory (quicker than SQLite's LIKE over the index of ids), finds the matches; few are
    then sorted, many are found along the index, where they are dense enough to fill a
    page quickly.
    """
    arguments = {"rows": FLEET_PAGE_ROWS}
    if text:
        needle = text.casefold()
        matches = [key for folded_id, key in current_app.config["FOLDED_IDS"] if needle in folded_id]
        arguments["keys"] = json.dumps(matches)
        counts = count_by_status(db, arguments["keys"])
    else:
        counts = count_by_status(db)
    pages = max(1, math.ceil(counts["devices"] / FLEET_PAGE_ROWS))
    page = min(page, pages)
    arguments["offset"] = (page - 1) * FLEET_PAGE_ROWS
    if text and len(matches) <= FILTER_SORTS_UP_TO:
        rows = db.execute(f"SELECT * FROM devices WHERE {MATCHED} ORDER BY {BY_CONCERN} LIMIT :rows OFFSET :offset",
                          arguments).fetchall()
    else:
        rows = db.execute(f"SELECT * FROM devices INDEXED BY devices_by_concern"
                          f" WHERE {MATCHED if text else 'device_key IN temp.listed'}"
                          f" ORDER BY {BY_CONCERN} LIMIT :rows OFFSET :offset", arguments).fetchall()
    return counts, page, pages, rows


def fleet_page(text: str, page: int) -> str:
    db = get_db()
    counts, page, pages, rows = read_fleet_page(db, text, page)
    now = now_ms()

    def page_url(number: int) -> str | None:
        return url_for(".index", page=number, q=text or None) if 1 <= number <= pages else None

    return render_template(
        "fleet.html", counts=counts, q=text, page=page, pages=pages,
        rows=[device_row(db, row, now, FLEET_STRIP_MINUTES, FLEET_STRIP_CELL_MINUTES) for row in rows],
        prev_url=page_url(page - 1), next_url=page_url(page + 1),
        keep_days=current_app.config["KEEP_DAYS"],
    )


@fleet.get("/devices/<device_id>")
def device_page(device_id: str):
    db = get_db()
    device = read_device(db, device_id)

    def html() -> str:
        now = now_ms()
        outages = [{**outage_view(started, ended),
                    "lasted": short_duration(ended - started) if ended is not None else f"{short_duration(now - started)} so far"}
                   for started, ended in read_outages(db, device["device_key"])]
        return render_template("device.html", device=device_row(db, device, now, DEVICE_STRIP_MINUTES, DEVICE_STRIP_CELL_MINUTES),
                               outages=outages, keep_days=current_app.config["KEEP_DAYS"])

    return negotiated(html, lambda: get_device(device_id))


def device_row(db: sqlite3.Connection, device: sqlite3.Row, now: int, strip_minutes: int, cell_minutes: int) -> dict:
    """What a page shows of a device: its view, how long since it was heard, its average
    as a person reads it (the exact one on hover) and its strip of online minutes."""
    view = device_view(device)
    status = view["status"]
    if status == "never":
        since = "never heard"
    elif status == "down":
        since = f"down for {short_duration(now - device['down_since_ms'])}"
    else:
        since = f"last heard {short_duration(now - device['last_heard_ms'])} ago"
    return {
        **view,
        "since": since,
        "url": url_for("fleet.device_page", device_id=device["device_id"]),
        "online_minutes": device["online_minutes"],
        "upload_count": device["upload_count"],
        "average": human_duration(mean_ns(device["upload_total_ns"], device["upload_count"])),
        "strip": online_strip(db, device, strip_minutes, cell_minutes),
    }


def online_strip(db: sqlite3.Connection, device: sqlite3.Row, strip_minutes: int, cell_minutes: int) -> dict | None:
    """A device's last strip_minutes of heartbeats, within its kept history, to be drawn in
    cells of cell_minutes; None if there are none."""
    if not device["online_minutes"]:
        return None
    last = device["last_minute"]
    first = max(minute for minute in (device["first_minute"], device["kept_from"], last - strip_minutes + 1)
                if minute is not None)
    if first > last:  # every heartbeat was before the kept history, and pruned
        return None
    hours = db.execute("SELECT hour, minutes FROM online_hours WHERE device_key = ? AND hour BETWEEN ? AND ?",
                       (device["device_key"], first // 60, last // 60)).fetchall()
    online, quarters = online_quarters(dict(hours), first, last)
    span = last - first  # exclusive, as uptime counts it
    return {
        "from": minute_to_rfc3339(first),
        "to": minute_to_rfc3339(last),
        "quarters": quarters,
        "cell_minutes": cell_minutes,
        "label": f"{min(online, span)} of {span} minute{'s' if span != 1 else ''} online" if span else "1 minute online",
    }


def online_quarters(bits_of_hour: dict[int, int], first: int, last: int) -> tuple[int, str]:
    """The minutes from first to last online: how many, and a hex digit per quarter hour
    (from the one of first to the one of last) saying how many of its minutes in that
    span were. The page's script draws the strip from the digits, so a page sends a
    character per quarter hour rather than markup per gap.

    ({0: 0b111, 1: 1 << 59}, 2, 119) gives (2, "10000001"): minutes 2 and 119.
    """
    online, quarters = 0, []
    for hour in range(first // 60, last // 60 + 1):
        bits = bits_of_hour.get(hour, 0)
        if hour == first // 60:
            bits &= -1 << first % 60
        if hour == last // 60:
            bits &= (1 << last % 60 + 1) - 1
        online += bits.bit_count()
        quarters.append(f"{(bits & QUARTER).bit_count():x}{(bits >> 15 & QUARTER).bit_count():x}"
                        f"{(bits >> 30 & QUARTER).bit_count():x}{(bits >> 45 & QUARTER).bit_count():x}")
    before_first, after_last = first % 60 // 15, 3 - last % 60 // 15  # quarters of those hours outside the span
    return online, "".join(quarters)[before_first:4 * len(quarters) - after_last]


def human_duration(ns: int) -> str:
    """A mean upload time as a person reads it: 3 min 22 s, 45.2 s, 850 ms."""
    # Each unit up to where it would round to the next one's first value.
    if ns < 999_500:
        return f"{ns / 1_000:.0f} µs" if ns >= 1_000 else f"{ns} ns"
    if ns < 999_500_000:
        return f"{ns / 1_000_000:.0f} ms"
    if ns < 59_950_000_000:
        return f"{ns / 1_000_000_000:.1f} s"
    seconds = round(ns / 1_000_000_000)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


# --- Metrics for Prometheus -----------------------------------------------------------

# Per-device series only for a fleet this small: a scrape of a larger one would be
# large, and every device a series of its own in the time-series database.
METRICS_PER_DEVICE_UP_TO = 1000

metrics = Blueprint("metrics", __name__)


class FleetCollector:
    """The fleet's metrics, read at each scrape: the devices by status and the alerts
    from the database, the requests from what the app counted (which the server window's
    activity line reads too)."""

    def __init__(self, app: Flask):
        self.app = app
        self.answered: Counter[tuple[str, int]] = Counter()  # (endpoint, status): requests
        self._lock = threading.Lock()

    def count(self, response):
        """An after_request hook. A plain count, not a prometheus_client counter's
        labels() on every request: this runs for every heartbeat."""
        with self._lock:
            self.answered[request.endpoint or "none", response.status_code] += 1
        return response

    def answers(self) -> Counter[tuple[str, int]]:
        """The requests answered so far, by (endpoint, status)."""
        with self._lock:
            return Counter(self.answered)

    def collect(self):
        answered = self.answers()
        requests = CounterMetricFamily("fleetmon_requests", "Requests answered, by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), count in sorted(answered.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        telemetry = CounterMetricFamily("fleetmon_telemetry", "Telemetry accepted, by kind", labels=["kind"])
        for kind, endpoint in (("heartbeat", "api.post_heartbeat"), ("upload", "api.post_stats")):
            telemetry.add_metric([kind], answered.get((endpoint, 204), 0))
        yield telemetry
        with self.app.app_context():
            db = get_db()
            counts = count_by_status(db)
            devices = GaugeMetricFamily("fleetmon_devices", "Devices of the devices file, by status", labels=["status"])
            for status in STATUSES:
                devices.add_metric([status], counts[status])
            yield devices
            alerts = CounterMetricFamily("fleetmon_alerts", "Changes of status, by the new status", labels=["status"])
            alerted = dict(db.execute("SELECT status, count(*) FROM alerts GROUP BY status").fetchall())
            for status in ("down", "up"):
                alerts.add_metric([status], alerted.get(status, 0))
            yield alerts
            if counts["devices"] <= METRICS_PER_DEVICE_UP_TO:
                up = GaugeMetricFamily("fleetmon_device_up", "1 if the device is up, 0 if down or never heard",
                                       labels=["device_id"])
                uptime = GaugeMetricFamily("fleetmon_device_uptime_percent", "The device's uptime, as GET stats has it",
                                           labels=["device_id"])
                for device in db.execute("SELECT * FROM devices WHERE device_key IN temp.listed ORDER BY device_id"):
                    up.add_metric([device["device_id"]], status_of(device) == "up")
                    uptime.add_metric([device["device_id"]], device["uptime"])
                yield up
                yield uptime


def init_metrics(app: Flask) -> None:
    collector = FleetCollector(app)
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    app.extensions["fleetmon.metrics"] = registry
    app.extensions["fleetmon.answers"] = collector.answers
    app.after_request(collector.count)


@metrics.get("/metrics")
def metrics_view():
    registry = current_app.extensions["fleetmon.metrics"]
    return prometheus_client.generate_latest(registry), 200, {"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}


# --- Debug views and docs -------------------------------------------------------------

debug = Blueprint("debug", __name__)
# Swagger UI from the swagger-ui-bundle package, so that the docs work offline.
docs = Blueprint("docs", __name__, static_folder=swagger_ui_path, static_url_path="/docs",
                 template_folder=swagger_ui_path)


@debug.get("/debug/devices")
def debug_devices():
    """The listed devices in id order, a page at a time: `next` continues the list."""
    rows, next_url = listed_page(".debug_devices")
    return {
        "devices": [
            {
                "device_id": row["device_id"],
                "has_sent": bool(row["online_minutes"] or row["upload_count"]),
                "online_minutes": row["online_minutes"],
                "upload_count": row["upload_count"],
                "history_kept_from": None if row["kept_from"] is None else minute_to_rfc3339(row["kept_from"]),
            }
            for row in rows
        ],
        "next": next_url,
    }


@debug.get("/debug/stats/<device_id>")
def debug_stats(device_id: str):
    db = get_db()
    row = read_device(db, device_id)
    has_heartbeats = row["online_minutes"] > 0
    stored = db.execute(
        "SELECT (SELECT count(*) FROM online_hours WHERE device_key = :key),"
        " (SELECT count(*) FROM uploads WHERE device_key = :key)", {"key": row["device_key"]}).fetchone()
    return {
        "device_id": device_id,
        "online_minutes": row["online_minutes"],
        "first_online_minute": minute_to_rfc3339(row["first_minute"]) if has_heartbeats else None,
        "last_online_minute": minute_to_rfc3339(row["last_minute"]) if has_heartbeats else None,
        "upload_count": row["upload_count"],
        "upload_total_ns": row["upload_total_ns"],
        "history_kept_from": None if row["kept_from"] is None else minute_to_rfc3339(row["kept_from"]),
        "stored_hours": stored[0],
        "stored_uploads": stored[1],
        "stats": device_stats(aggregates_of(row)),
    }


@docs.get("/openapi.json")
def openapi_document():
    return current_app.extensions["fleetmon.openapi"]


@docs.get("/docs/")
def docs_page():
    return render_template("index.j2", openapi_spec_url=url_for(".openapi_document"))


# --- Putting it together --------------------------------------------------------------


def create_app(database: Path = DEFAULT_DATABASE, devices_csv: Path = DEFAULT_DEVICES_CSV,
               keep_days: int | None = None) -> Flask:
    """The app factory. Raises StartupError for an unusable devices file or database.

    Its owner calls close_storage(app) when done with it.
    """
    app = Flask(__name__, static_folder=None)
    app.config.update(
        DATABASE=Path(database),
        DEVICES_CSV=Path(devices_csv),
        KEEP_DAYS=keep_days,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    # A path with "//" is an unknown path, not a redirect to another one.
    app.url_map.merge_slashes = False
    with app.open_resource("openapi.json") as document:
        app.extensions["fleetmon.openapi"] = json.load(document)
    app.extensions["fleetmon.heard"] = []
    app.extensions["fleetmon.errors_seen"] = set()
    init_storage(app, load_device_ids(Path(devices_csv)))
    init_fleet(app)
    init_metrics(app)
    for blueprint in (api, fleet, metrics, debug, docs):
        app.register_blueprint(blueprint)
    return app


ACTIVITY_INTERVAL_SECONDS = 10
# The answers the activity line counts, by the endpoint that gives them.
ACTIVITY_KINDS = {"api.post_heartbeat": "heartbeats", "api.post_stats": "uploads", "api.get_stats": "stats reads"}


class Activity:
    """What the server answered since the last line, told as one line an interval, and
    nothing while idle: telemetry answered, and every error fleetmon answers (not those
    waitress answers itself, before fleetmon sees the request)."""

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
            elif endpoint in ACTIVITY_KINDS:
                telemetry[ACTIVITY_KINDS[endpoint]] += count
        if not telemetry and not errors:
            return None
        parts = [f"{telemetry[kind]:,} {kind}" for kind in ACTIVITY_KINDS.values()]
        rejected = sum(n for status, n in errors.items() if status < 500)
        parts.append(f"{rejected:,} rejected")
        if rejected < errors.total():
            parts.append(f"{errors.total() - rejected:,} failed")
        line = f"fleetmon: last {seconds:.0f} s: " + ", ".join(parts)
        if errors:
            line += " (" + ", ".join(f"{status} x{n:,}" for status, n in sorted(errors.items())) + ")"
        return line


def report_activity(activity: Activity, stop: threading.Event) -> None:
    while not stop.wait(ACTIVITY_INTERVAL_SECONDS):
        line = activity.take_line(time.monotonic())
        if line:
            print(line, flush=True)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(app: Flask, host: str, port: int, down_after_seconds: float, alert_url: str | None) -> None:
    """Serve app with waitress until Ctrl+C, with the housekeeping beside it, telling
    what it does."""
    try:
        server = create_server(app, host, port)
    except OSError as error:
        in_use = error.errno == errno.EADDRINUSE
        reason = "the port is in use (another fleetmon? --port chooses another)" if in_use else error.strerror
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
    activity = Activity(app.extensions["fleetmon.answers"], time.monotonic())
    stop = threading.Event()
    reporter = threading.Thread(target=report_activity, args=(activity, stop), name="fleetmon activity")
    try:
        housekeeping = Housekeeping(app, down_after_seconds, alert_url, app.config["KEEP_DAYS"],
                                    announce=lambda line: print(line, flush=True))
    except BaseException:
        server.close()
        raise
    try:
        devices = len(app.config["DEVICE_KEYS"])
        url = f"http://{url_host(host)}:{server.effective_port}"
        if app.config["UPGRADED"]:
            print(f"fleetmon: {app.config['UPGRADED']}")
        print(f"fleetmon: {devices:,} device{'s' if devices != 1 else ''} from {app.config['DEVICES_CSV'].absolute()}, "
              f"database {app.config['DATABASE'].absolute()}")
        print(f"fleetmon: a device is down after {short_duration(int(down_after_seconds * 1000))} unheard"
              + (f"; alerts to {alert_url}" if alert_url else "")
              + (f"; history kept {app.config['KEEP_DAYS']} days" if app.config["KEEP_DAYS"] else ""))
        print(f"fleetmon: listening on {url}/api/v1 (fleet page {url}/, docs {url}/docs/)", flush=True)
        reporter.start()
        housekeeping.start()
        # What the start built lives as long as the server (the devices' ids, above all):
        # kept out of the garbage collector's sight, a full collection no longer walks it
        # all while the one worker waits.
        gc.freeze()
        server.run()  # until Ctrl+C, which it catches
    finally:
        gc.unfreeze()
        stop.set()
        if reporter.is_alive():
            reporter.join()
        housekeeping.close()
        server.close()
        last_line = activity.take_line(time.monotonic())
        if last_line:
            print(last_line)
        print("fleetmon: stopped", flush=True)


def seconds_argument(text: str) -> float:
    """--down-after: seconds, or a number with s, m or h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give seconds, or a number with s, m or h, like 5m")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetmon.py", description="Serve fleetmon with waitress.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--devices", type=Path, default=DEFAULT_DEVICES_CSV,
                        help="devices CSV (default: beside fleetmon.py)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DATABASE, help="SQLite database (default: beside fleetmon.py)")
    parser.add_argument("--down-after", type=seconds_argument, default=DEFAULT_DOWN_AFTER_SECONDS, metavar="TIME",
                        help="a device not heard for this long is down: seconds, or with s, m or h (default 5m)")
    parser.add_argument("--alert-url", metavar="URL", help="POST each change of status here as JSON (a Slack or "
                        "Mattermost incoming webhook shows its text)")
    parser.add_argument("--keep-days", type=int, metavar="N", help="prune raw telemetry more than N days older than "
                        "each device's newest (default: keep everything); stats are kept whole")
    args = parser.parse_args(argv)

    if not 0 <= args.port <= 65535:
        print(f"fleetmon: port {args.port} is outside 0-65535", file=sys.stderr)
        return 1
    if args.keep_days is not None and args.keep_days < 1:
        print(f"fleetmon: --keep-days must be 1 or more, not {args.keep_days}", file=sys.stderr)
        return 1
    if args.alert_url and not args.alert_url.startswith(("http://", "https://")):
        print(f"fleetmon: --alert-url must be an http:// or https:// URL, not {args.alert_url!r}", file=sys.stderr)
        return 1
    try:
        app = create_app(database=args.db, devices_csv=args.devices, keep_days=args.keep_days)
        try:
            serve(app, args.host, args.port, args.down_after, args.alert_url)
        finally:
            close_storage(app)
    except StartupError as error:
        print(f"fleetmon: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
