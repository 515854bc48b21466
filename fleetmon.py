"""fleetmon: uptime and average upload time for a fleet of edge devices.

Devices post a heartbeat every minute and, after each video upload, how long it took.
fleetmon keeps both in SQLite and answers, per device, its uptime and its mean upload
time, exactly as the device simulator computes them.

Run it with ``python fleetmon.py`` (see ``--help``), or ``flask --app fleetmon run``.
"""

import argparse
import csv
import json
import logging
import re
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import waitress
from flask import Blueprint, Flask, abort, current_app, render_template_string, request, url_for
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import HTTPException

# --- Configuration ------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
DEFAULT_DEVICES_CSV = HERE / "devices.csv"
DEFAULT_DATABASE = HERE / "fleetmon.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6733

MAX_BODY_BYTES = 64 * 1024
INT64_MAX = 2**63 - 1
# How long a statement waits for another connection's write lock (another process on
# the same database, say) before it fails. A write holds the lock for microseconds,
# a checkpoint of the WAL for milliseconds.
BUSY_TIMEOUT_SECONDS = 10
# One worker thread: Python runs one thread at a time and SQLite takes one writer at a
# time, so more threads only add hand-offs between them (16 clients posting heartbeats:
# about 3,200 requests/s with one thread, 2,800 with waitress's default four).
# waitress reads and writes the sockets in its own thread, so slow clients hold no worker.
WAITRESS_THREADS = 1


class StartupError(Exception):
    """A problem that stops fleetmon from starting, told in one line."""


def load_device_ids(path: Path) -> frozenset[str]:
    """Read the ids under the ``device_id`` column of a CSV file.

    Tolerates what spreadsheets write: a UTF-8 byte-order mark, spaces around values,
    blank lines and repeated ids.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(csv.reader(file))
    except OSError as error:
        raise StartupError(f"cannot read devices file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise StartupError(f"devices file {path} is not UTF-8 text") from None
    header = [name.strip() for name in rows[0]] if rows else []
    if "device_id" not in header:
        raise StartupError(f"devices file {path} has no device_id column in its first line")
    column = header.index("device_id")
    return frozenset(
        row[column].strip() for row in rows[1:] if len(row) > column and row[column].strip()
    )


# --- Storage ------------------------------------------------------------------------


def connect(database: Path) -> sqlite3.Connection:
    # Autocommit: each statement below is a whole transaction, committed before execute()
    # returns, triggers included. So a 204 is only sent for what is committed.
    db = sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    db.row_factory = sqlite3.Row
    # In WAL mode, NORMAL still makes every commit survive the process being killed;
    # only a power cut or OS crash can take back the last few.
    db.execute("PRAGMA synchronous = NORMAL")
    return db


def init_db(app: Flask) -> None:
    """Apply schema.sql and give every known device its row of aggregates."""
    db = connect(app.config["DATABASE"])
    try:
        with app.open_resource("schema.sql") as schema:
            db.executescript(schema.read().decode("utf-8"))
        db.execute("BEGIN")
        db.executemany(
            "INSERT OR IGNORE INTO device_stats (device_id) VALUES (?)",
            ((device_id,) for device_id in app.config["DEVICE_IDS"]),
        )
        db.execute("COMMIT")
    finally:
        db.close()


def get_db() -> sqlite3.Connection:
    """This thread's connection to the app's database.

    flaskr opens one per request; fleetmon keeps one per worker thread, because opening
    one costs twice as much as all the rest of a heartbeat (830 instead of 3,500
    requests/s when measured).
    """
    connections = current_app.extensions["fleetmon.connections"]
    if not hasattr(connections, "db"):
        connections.db = connect(current_app.config["DATABASE"])
    return connections.db


@contextmanager
def writable_db() -> Iterator[sqlite3.Connection]:
    """This thread's connection, holding the app's write lock.

    SQLite lets one connection write at a time and makes the others poll for the lock,
    sleeping between tries; a Python lock hands it straight to the next writer instead.
    """
    with current_app.extensions["fleetmon.write_lock"]:
        yield get_db()


def record_heartbeat(db: sqlite3.Connection, device_id: str, minute: int) -> None:
    """Mark a minute online; the trigger count_online_minute updates device_stats."""
    db.execute(
        "INSERT OR IGNORE INTO heartbeat_minutes (device_id, minute) VALUES (?, ?)",
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


# --- Maths --------------------------------------------------------------------------

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
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
        utc = local.astimezone(timezone.utc)
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


def stats_from_aggregates(aggregates: Mapping) -> dict | None:
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


# --- HTTP ---------------------------------------------------------------------------

bp = Blueprint("fleetmon", __name__)


@bp.app_errorhandler(HTTPException)
def error_as_json(error: HTTPException):
    """Every error, including Flask's own 404, 405, 413 and 500, as {"msg": ...}."""
    response = error.get_response()  # keeps headers such as Allow on a 405
    response.set_data(current_app.json.dumps({"msg": error.description}))
    response.content_type = "application/json"
    return response


def no_content():
    """204: no body, and so no Content-Type either."""
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


def require_known_device(device_id: str) -> None:
    if device_id not in current_app.config["DEVICE_IDS"]:
        abort(404, "device not found")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json would accept NaN and Infinity


def json_object_body() -> dict:
    """The request body as a JSON object, whatever its Content-Type says."""
    try:
        body = json.loads(request.get_data(), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
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


@bp.post("/api/v1/devices/<device_id>/heartbeat")
def post_heartbeat(device_id: str):
    require_known_device(device_id)
    minute = sent_at_minute(json_object_body())
    with writable_db() as db:
        record_heartbeat(db, device_id, minute)
    return no_content()


@bp.post("/api/v1/devices/<device_id>/stats")
def post_stats(device_id: str):
    require_known_device(device_id)
    body = json_object_body()
    sent_at_minute(body)  # validated like a heartbeat's, but not a heartbeat
    upload_time = upload_time_ns(body)
    with writable_db() as db:
        added = record_upload(db, device_id, body["sent_at"], upload_time)
    if not added:
        abort(409, "this upload_time would overflow the device's total upload time "
                   f"({INT64_MAX} ns); nothing was stored")
    return no_content()


@bp.get("/api/v1/devices/<device_id>/stats")
def get_stats(device_id: str):
    require_known_device(device_id)
    stats = stats_from_aggregates(read_device_stats(get_db(), device_id))
    if stats is None:
        return no_content()
    return stats


@bp.get("/")
def index():
    device_ids = current_app.config["DEVICE_IDS"]
    example = min(device_ids, default=None)
    return {
        "name": "fleetmon",
        "version": current_app.extensions["fleetmon.openapi"]["info"]["version"],
        "devices": len(device_ids),
        "links": {
            "docs": url_for(".docs"),
            "openapi": url_for(".openapi_document"),
            "example_stats": url_for(".get_stats", device_id=example) if example else None,
        },
    }


@bp.get("/openapi.json")
def openapi_document():
    # The servers entry names this very server, so "Try it out" works on any port.
    document = dict(current_app.extensions["fleetmon.openapi"])
    document["servers"] = [{"url": request.host_url.rstrip("/"), "description": "this fleetmon"}]
    return document


@bp.get("/docs/")
def docs():
    """Swagger UI from the swagger-ui-bundle package, so the docs work offline."""
    template = (swagger_ui_path / "index.j2").read_text(encoding="utf-8")
    return render_template_string(template, openapi_spec_url=url_for(".openapi_document"))


@bp.get("/debug/devices")
def debug_devices():
    rows = get_db().execute(
        "SELECT device_id, online_minutes, upload_count FROM device_stats ORDER BY device_id"
    )
    device_ids = current_app.config["DEVICE_IDS"]
    return {
        "devices": [
            {
                "device_id": row["device_id"],
                "has_sent": bool(row["online_minutes"] or row["upload_count"]),
                "online_minutes": row["online_minutes"],
                "upload_count": row["upload_count"],
            }
            for row in rows
            if row["device_id"] in device_ids
        ]
    }


@bp.get("/debug/stats/<device_id>")
def debug_stats(device_id: str):
    require_known_device(device_id)
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


def create_app(database: Path = DEFAULT_DATABASE, devices_csv: Path = DEFAULT_DEVICES_CSV) -> Flask:
    """The app factory. Raises StartupError if the devices file is missing or unusable."""
    # Swagger UI's files are the app's only static files, served under /docs/.
    app = Flask(__name__, static_folder=str(swagger_ui_path), static_url_path="/docs")
    app.config.update(
        DATABASE=Path(database),
        DEVICE_IDS=load_device_ids(Path(devices_csv)),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    with app.open_resource("openapi.json") as document:
        app.extensions["fleetmon.openapi"] = json.load(document)
    app.extensions["fleetmon.connections"] = threading.local()
    app.extensions["fleetmon.write_lock"] = threading.Lock()
    init_db(app)
    app.register_blueprint(bp)
    return app


# --- Entry point --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve fleetmon with waitress.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--devices", type=Path, default=DEFAULT_DEVICES_CSV, help="devices CSV (default: beside fleetmon.py)")
    parser.add_argument("--db", type=Path, default=DEFAULT_DATABASE, help="SQLite database (default: beside fleetmon.py)")
    args = parser.parse_args(argv)
    try:
        app = create_app(database=args.db, devices_csv=args.devices)
    except StartupError as error:
        sys.exit(f"fleetmon: {error}")
    # With one worker thread requests queue by design; waitress would warn of every queue.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(app, host=args.host, port=args.port, threads=WAITRESS_THREADS)
    url = f"http://{args.host}:{server.effective_port}"
    print(f"fleetmon: {len(app.config['DEVICE_IDS'])} devices from {args.devices}, database {args.db}")
    print(f"fleetmon: listening on {url}/api/v1 (docs at {url}/docs/)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
