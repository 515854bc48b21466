"""fleetmon: uptime and average upload time for a fleet of edge devices.

Devices post a heartbeat every minute and, after each video upload, how long it took.
fleetmon keeps both in SQLite and answers, per device, its uptime and its mean upload
time, exactly as the vendor's device simulator computes them. That is the contract, and
this module is it, read top to bottom: settings, the maths, the devices file, storage,
the three views, the app factory, serving on waitress, and main.

What an operator needs around it (who is down, alerts, retention, the fleet's pages,
metrics, the docs) lives in modules beside this one, each named for what it is, and is
wired in by create_app, as Flask's tutorial registers its blueprints. A database of an
earlier fleetmon is brought up to date by upgrades.py, at the start.

    python fleetmon.py             serve (see --help)
    python simulator.py            drive it with the vendor's simulated day

``flask --app fleetmon run`` works too, for development.
"""

import argparse
import csv
import errno
import gc
import io
import json
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from flask import Blueprint, Flask, abort, current_app, g, request
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
# Telemetry stamped further ahead of fleetmon's clock than this comes from no device's
# real clock; counted, one such heartbeat would stretch the device's uptime span for good.
# The past stays open: a replayed day from long ago is what the simulator sends.
MAX_AHEAD = timedelta(days=1)


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


def ms_to_rfc3339(ms: int) -> str:
    """fleetmon's own clock, in ms since 1970, as the API writes it: 2024-01-01T10:04:00.250Z."""
    return (UNIX_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def go_duration(ns: int) -> str:
    """Nanoseconds exactly as Go's time.Duration.String() writes them, for the simulator
    that compares avg_upload_time as a string.

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


def human_duration(ns: int) -> str:
    """A duration as a person reads it, on the pages and in the server window, to about
    three figures: 850 ms, 45.2 s, 3 min 22 s, 2 h 5 min, 3 d 4 h. Never negative."""
    ns = max(0, ns)
    # Each unit up to where it would round to the next one's first value.
    if ns < 999_500:
        return f"{ns / 1_000:.0f} µs" if ns >= 1_000 else f"{ns} ns"
    if ns < 999_500_000:
        return f"{ns / 1_000_000:.0f} ms"
    if ns < 59_950_000_000:
        return f"{ns / 1_000_000_000:.1f}".removesuffix(".0") + " s"
    seconds = round(ns / 1_000_000_000)
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60), ("min", 60, "s", 1)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            return f"{whole} {unit} {rest // smaller_size} {smaller}" if rest // smaller_size else f"{whole} {unit}"
    raise AssertionError("unreachable: at least a minute here")


class Aggregates(NamedTuple):
    """What fleetmon keeps per device for its stats, whatever the history's length."""

    online_minutes: int
    first_minute: int | None
    last_minute: int | None
    upload_count: int
    upload_total_ns: int


def has_sent(aggregates: Aggregates) -> bool:
    """Whether the device has sent anything that counts: a heartbeat or an upload."""
    return aggregates.online_minutes > 0 or aggregates.upload_count > 0


def device_stats(aggregates: Aggregates) -> dict | None:
    """GET stats' answer from a device's aggregates; None while it has sent nothing."""
    if not has_sent(aggregates):
        return None
    return {
        "uptime": uptime_percent(aggregates.online_minutes, aggregates.first_minute, aggregates.last_minute),
        "avg_upload_time": go_duration(mean_ns(aggregates.upload_total_ns, aggregates.upload_count)),
    }


# --- The devices file -----------------------------------------------------------------


def load_device_ids(path: Path) -> frozenset[str]:
    """Read the ids under the ``device_id`` column of a CSV file.

    Tolerates what spreadsheets write: a UTF-8 byte-order mark, spaces around values,
    blank lines, repeated ids, and the semicolons that Excel separates with where the
    comma is the decimal sign. Refuses a file that lists no device; an id that no URL can
    reach: one with a '/', or '.' and '..', which browsers resolve away; and an id with a
    control character, which would start a new line wherever it is printed.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            text = file.read()
    except OSError as error:
        raise StartupError(f"cannot read devices file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"devices file {path} is not UTF-8 text") from None
    first_line = text.partition("\n")[0]
    delimiter = ";" if ";" in first_line and "," not in first_line else ","
    rows = list(enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1))
    header = [name.strip() for name in rows[0][1]] if rows else []
    if "device_id" not in header:
        raise StartupError(f"devices file {path} has no device_id column in its first line")
    column = header.index("device_id")
    device_ids = set()
    for line, row in rows[1:]:
        device_id = row[column].strip() if len(row) > column else ""
        if "/" in device_id or device_id in (".", ".."):
            raise StartupError(f"devices file {path}, line {line}: no URL can carry the device id {device_id!r}")
        if not device_id.isprintable():
            raise StartupError(f"devices file {path}, line {line}: the device id {device_id!r} has a control character")
        if device_id:
            device_ids.add(device_id)
    if not device_ids:
        raise StartupError(f"devices file {path} lists no devices under device_id")
    return frozenset(device_ids)


# --- Storage --------------------------------------------------------------------------

SCHEMA_VERSION = 3
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


class DatabaseLock:
    """One fleetmon per database: a lock on the file `<database>.lock`, which the
    operating system releases when its holder exits, however it exits (kill -9 too).
    The file stays between holders."""

    def __init__(self, database: Path):
        self.path = database.with_name(database.name + ".lock")
        self._file = None

    def acquire(self) -> None:
        file = open(self.path, "a+b")  # noqa: SIM115 (held open while the lock is held)
        try:
            if sys.platform == "win32":
                import msvcrt

                file.seek(0)
                msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.close()
            raise StartupError(f"database {self.path.with_suffix('')} is in use by another fleetmon "
                               "(--db chooses another)") from None
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def init_storage(app: Flask, device_ids: frozenset[str]) -> None:
    """Take the database for this fleetmon alone, upgrade it if it is an old one, apply
    schema.sql, mark the devices the devices file lists, and give the app its connections
    and DEVICE_KEYS: the devices file's ids, each with its key."""
    database = app.config["DATABASE"]
    if not database.parent.is_dir():
        raise StartupError(f"cannot use database {database}: there is no folder {database.parent}")
    lock = DatabaseLock(database)
    lock.acquire()
    try:
        with app.open_resource("schema.sql") as file:
            schema = file.read().decode("utf-8")
        with closing(connect(database)) as db:
            import upgrades  # a database of an earlier fleetmon, brought up to SCHEMA_VERSION

            app.config["UPGRADED"] = upgrades.upgrade(db, database, schema)
            db.executescript(schema)  # what a new database is made of; an upgraded one has it
            if schema_version(db) == 0:  # a new database
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            app.config["DEVICE_KEYS"] = list_devices(db, device_ids)
    except sqlite3.Error as error:
        lock.release()
        raise StartupError(f"cannot use database {database}: {error}") from None
    except BaseException:
        lock.release()
        raise
    app.extensions["fleetmon.lock"] = lock
    app.extensions["fleetmon.pool"] = ConnectionPool(database)
    app.teardown_appcontext(release_db)


def list_devices(db: sqlite3.Connection, device_ids: frozenset[str]) -> dict[str, int]:
    """Give each device of the devices file its row, mark which devices it lists now, and
    return their keys, in id order: writes name a device by its key, an integer, not its text id.
    Writes nothing where nothing changed, so that a start needs no free disk space."""
    ids = json.dumps(sorted(device_ids))
    with transaction(db):
        db.execute("INSERT INTO devices (device_id, listed) SELECT value, 1 FROM json_each(?) WHERE true"
                   " ON CONFLICT (device_id) DO UPDATE SET listed = 1 WHERE NOT listed", (ids,))
        db.execute("UPDATE devices SET listed = 0 WHERE listed AND device_id NOT IN (SELECT value FROM json_each(?))",
                   (ids,))
    return dict(db.execute("SELECT device_id, device_key FROM devices WHERE listed ORDER BY device_id").fetchall())


class ConnectionPool:
    """Open connections to one database, each lent to one request at a time."""

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


def close_storage(app: Flask) -> None:
    """Close the app's idle connections and let the database go: the end of its life (a
    test's, the server's)."""
    app.extensions["fleetmon.pool"].close()
    app.extensions["fleetmon.lock"].release()


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


def make_room(database: Path) -> None:
    """After a write failed on a full disk: fold the write-ahead log into the database and
    empty it, so that space freed meanwhile serves the next write rather than the log."""
    try:
        with closing(connect(database)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass  # still full: the next failure tries again


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
        # Closed, not given back: the next request starts afresh (once a full disk is
        # freed, or a read-only file made writable).
        if "db" in g:
            g.pop("db").close()
        if error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
            make_room(current_app.config["DATABASE"])
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


# One for every body: json.loads, given these, makes a decoder on each call, 16,000
# instructions of a heartbeat (callgrind).
BODY_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_int=_parse_int)


def json_object_body() -> dict:
    """The request body as a JSON object, whatever its Content-Type says."""
    try:
        body = BODY_DECODER.decode(request.get_data().decode("utf-8"))  # JSON on the wire is UTF-8
    except InvalidBody as error:
        abort(400, str(error))
    except RecursionError:
        abort(400, "body is nested too deeply")
    except ValueError:
        abort(400, "body is not valid JSON")
    if not isinstance(body, dict):
        abort(400, "body must be a JSON object")
    return body


def sent_at_field(body: dict, heard_at_ms: int) -> datetime:
    """Validate body["sent_at"] and return it in UTC."""
    if "sent_at" not in body:
        abort(400, "sent_at is required")
    message = "sent_at must be an RFC 3339 date-time with an offset, like 2024-01-01T10:04:00Z"
    if not isinstance(body["sent_at"], str):
        abort(400, message)
    try:
        sent_at = utc_datetime(body["sent_at"])
    except ValueError:
        abort(400, message)
    if sent_at - UNIX_EPOCH > timedelta(milliseconds=heard_at_ms) + MAX_AHEAD:
        abort(400, f"sent_at is more than a day ahead of fleetmon's clock ({ms_to_rfc3339(heard_at_ms)})")
    return sent_at


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
    heard_at = now_ms()
    minute = minute_of(sent_at_field(json_object_body(), heard_at))
    record_heartbeat(get_db(), current_app.config["DEVICE_KEYS"][device_id], minute, heard_at)
    tell_heard(device_id, heard_at)
    return no_content()


@api.post("/api/v1/devices/<device_id>/stats")
def post_stats(device_id: str):
    heard_at = now_ms()
    body = json_object_body()
    sent_at = sent_at_field(body, heard_at)  # validated like a heartbeat's, but no heartbeat
    upload_time = upload_time_field(body)
    record_upload(get_db(), current_app.config["DEVICE_KEYS"][device_id], sent_at, upload_time, heard_at)
    tell_heard(device_id, heard_at)
    return no_content()


@api.get("/api/v1/devices/<device_id>/stats")
def get_stats(device_id: str):
    stats = device_stats(aggregates_of(read_device(get_db(), device_id)))
    if stats is None:
        return no_content()
    return stats


# --- The app factory ------------------------------------------------------------------


class Fleetmon(Flask):
    """Flask, for views and hooks that are plain functions, never `async def`."""

    def ensure_sync(self, func):
        # Flask asks of each, on each call, whether it is a coroutine: 22,000 instructions
        # of a heartbeat's 763,000 (callgrind).
        return func


def create_app(database: Path = DEFAULT_DATABASE, devices_csv: Path = DEFAULT_DEVICES_CSV,
               keep_days: int | None = None, down_after_seconds: float = DEFAULT_DOWN_AFTER_SECONDS,
               alert_url: str | None = None, **settings) -> Flask:
    """The app factory. Raises StartupError for an unusable devices file or database.

    Its owner calls close_storage(app) when done with it.
    """
    app = Fleetmon(__name__, static_folder=None)
    app.config.update(
        DATABASE=Path(database),
        DEVICES_CSV=Path(devices_csv),
        KEEP_DAYS=keep_days,
        DOWN_AFTER_SECONDS=down_after_seconds,
        ALERT_URL=alert_url,
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        **settings,
    )
    # A path with "//" is an unknown path, not a redirect to another one.
    app.url_map.merge_slashes = False
    app.extensions["fleetmon.heard"] = []
    app.extensions["fleetmon.background"] = []
    app.extensions["fleetmon.errors_seen"] = set()
    device_ids = load_device_ids(Path(devices_csv))
    init_storage(app, device_ids)
    app.register_blueprint(api)

    # The monitor beside the contract, each module adding its views or its work.
    import access
    import activity
    import debug
    import docs
    import fleet
    import housekeeping
    import metrics

    for module in (access, fleet, metrics, debug, docs, housekeeping, activity):
        module.init_app(app)
    return app


# --- Serving on waitress --------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before anything else is opened or created, so that a
    port in use stops the start with nothing left behind."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        in_use = error.errno == errno.EADDRINUSE
        reason = "the port is in use (another fleetmon? --port chooses another)" if in_use else error.strerror
        raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(app: Flask, listener: socket.socket, announce=print) -> None:
    """Serve app with waitress on listener until Ctrl+C or SIGTERM, with the monitor's
    work beside it, telling what it does. Closes listener.

    What the monitor's work says as it starts waits until all of it has started: a start
    that fails says only why."""
    import connections

    server = connections.create_server(app, listener)
    started: list[str] | None = []

    def announce_once_started(line: str) -> None:
        if started is None:
            announce(line)
        else:
            started.append(line)

    listening = False

    def tell_stopped() -> None:
        if listening:
            announce("fleetmon: stopped")

    with ExitStack() as running:
        # SIGTERM, what a service manager sends to stop, ends the server as Ctrl+C does.
        previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
        running.callback(signal.signal, signal.SIGTERM, previous_sigterm)
        running.callback(tell_stopped)  # the last line
        running.callback(server.close)
        for start in app.extensions["fleetmon.background"]:
            running.enter_context(start(app, announce_once_started))
        lines, started = started, None
        host, port = listener.getsockname()[:2]
        url = f"http://{url_host(host)}:{port}"
        if app.config["UPGRADED"]:
            announce(f"fleetmon: {app.config['UPGRADED']}")
        devices = len(app.config["DEVICE_KEYS"])
        announce(f"fleetmon: {devices:,} device{'s' if devices != 1 else ''} from "
                 f"{app.config['DEVICES_CSV'].absolute()}, database {app.config['DATABASE'].absolute()}")
        for line in lines:
            announce(line)
        announce(f"fleetmon: listening on {url}/api/v1 (fleet page {url}/, docs {url}/docs/)")
        listening = True
        # Jinja compiles a template, and the one it extends, when a page first needs it:
        # the first fleet page after a start, at 100,000 devices, took 34-68 ms that way,
        # and 14-23 ms with them compiled here.
        for template in app.jinja_env.list_templates():
            app.jinja_env.get_template(template)
        # What the start built lives as long as the server, the devices' ids above all: out
        # of the garbage collector's sight, a full collection at 100,000 devices holds the
        # workers up for 0.01 ms rather than 14 ms.
        gc.freeze()
        running.callback(gc.unfreeze)
        server.run()  # until Ctrl+C, which it catches


# --- main -----------------------------------------------------------------------------


def whole_number(low: int, high: int, what: str):
    """An argparse type: a whole number from low to high, or "'text' is not {what}"."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return int(text)
    return parse


class OneLineParser(argparse.ArgumentParser):
    """Refuses a mistaken command line in one line, as every other mistake at start is."""

    def error(self, message: str):
        # A value that begins with "-" (--down-after -5s) is taken for an option.
        message = message.replace("expected one argument", "expected a value (one beginning with - goes as --option=VALUE)")
        self.exit(2, f"fleetmon: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    # Whatever the console or file takes, a device id prints: escaped if it must be.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
    # No abbreviations: --password would pass for --password-file, and the password be shown.
    parser = OneLineParser(prog="fleetmon.py", description="Serve fleetmon with waitress.", allow_abbrev=False)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=whole_number(0, 65535, "a port from 0 to 65535"), default=DEFAULT_PORT,
                        help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--devices", type=Path, default=DEFAULT_DEVICES_CSV,
                        help="devices CSV (default: beside fleetmon.py)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DATABASE, help="SQLite database (default: beside fleetmon.py)")
    import access  # the monitor's options, each with the module it is for
    import alerts
    import retention
    import status

    for module in (status, alerts, retention, access):
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        operators = access.operator_settings(args)
        with ExitStack() as started:
            listener = started.enter_context(listen(args.host, args.port))
            app = create_app(database=args.db, devices_csv=args.devices, keep_days=args.keep_days,
                             down_after_seconds=args.down_after, alert_url=args.alert_url, **operators)
            started.callback(close_storage, app)
            serve(app, listener)
    except StartupError as error:
        print(f"fleetmon: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The modules beside this one import it as fleetmon: main runs there, not in this
    # second copy of it, so that they and it share one StartupError and one app.
    import fleetmon

    sys.exit(fleetmon.main())
