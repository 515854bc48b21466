"""The fleet: its API (the devices by status, one device with its outages) and its pages
for a browser (the fleet, a page per device), on the same URLs, by what the client accepts.

A page has a worker of its own, beside the devices' (connections.Lanes), but shares the
GIL and the disk with them, so a page reads along indexes, its cost must not grow with
the fleet, and it gives way to a device's request between its rows, as the devices'
list does.
"""

import functools
import json
import math
import sqlite3
from itertools import chain, islice

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    render_template,
    request,
    url_for,
)

from fleetmon import (
    aggregates_of,
    device_stats,
    get_db,
    has_sent,
    human_duration,
    mean_ns,
    minute_to_rfc3339,
    ms_to_rfc3339,
    now_ms,
    read_device,
)
from status import STATUSES, read_outages, status_of

LIST_LIMIT = 1000
FLEET_PAGE_ROWS = 50
MAX_FLEET_PAGE = 1_000_000
MAX_FILTER_CHARACTERS = 200
FILTERS_REMEMBERED = 16
FLEET_STRIP_MINUTES = 24 * 60
DEVICE_STRIP_MINUTES = 7 * 24 * 60
# A strip is drawn in cells of at least so many minutes (a multiple of 15 dividing 60), at
# most 97 on the fleet page and 169 on a device's, however many gaps its device had; the
# page's script makes them longer where the strip is too narrow for that many.
FLEET_STRIP_CELL_MINUTES = 15
DEVICE_STRIP_CELL_MINUTES = 60
QUARTER = (1 << 15) - 1  # the minutes of a quarter hour, as bits of an hour's
# The fleet page's order, as the index devices_by_concern of schema.sql has it, so that a
# page of it is a walk along that index.
CONCERN_TERMS = ("down_since_ms IS NULL", "down_since_ms", "online_minutes = 0 AND upload_count = 0", "uptime", "device_id")
BY_CONCERN = ", ".join(CONCERN_TERMS)
BACKWARDS = ", ".join(f"{term} DESC" for term in CONCERN_TERMS)

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


def device_view(device: sqlite3.Row) -> dict:
    """A device as the API lists it."""
    stats = device_stats(aggregates_of(device)) or {"uptime": None, "avg_upload_time": None}
    return {
        "device_id": device["device_id"],
        "status": status_of(device),
        "last_heard": None if device["last_heard_ms"] is None else ms_to_rfc3339(device["last_heard_ms"]),
        "down_since": None if device["down_since_ms"] is None else ms_to_rfc3339(device["down_since_ms"]),
        "history_kept_from": history_kept_from(device),
        **stats,
    }


def history_kept_from(device: sqlite3.Row) -> str | None:
    """Where the device's kept history begins, if retention has pruned any of it."""
    return None if device["kept_from"] is None else minute_to_rfc3339(device["kept_from"])


def outage_view(started: int, ended: int | None) -> dict:
    """An outage as the API shows it."""
    return {"started": ms_to_rfc3339(started), "ended": None if ended is None else ms_to_rfc3339(ended),
            # Never negative, though the wall clock may step back between the two.
            "seconds": None if ended is None else max(0, ended - started) / 1000}


def give_way_to_devices() -> None:
    """Wait while a device's request is being served, if waitress serves this app: a
    page's Python would hold up the devices' worker (connections.Lanes). That wait is
    the device request's whole time, SQLite's for its write lock included. Called with
    no statement of the page's still being read."""
    give_way = current_app.extensions.get("connections.give_way")
    if give_way is not None:
        give_way()


def listed_page(endpoint: str, condition: str = "true", **arguments) -> tuple[list[sqlite3.Row], str | None]:
    """A page of the listed devices that meet condition, in id order from the request's
    `after`, `limit` of them; and the URL of endpoint for the next page, if there is one."""
    limit = int_argument("limit", 100, 1, LIST_LIMIT)
    rows = get_db().execute(
        f"SELECT * FROM devices WHERE device_id > ? AND listed"
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
    devices = []
    for row in rows:
        give_way_to_devices()  # a list of 1,000 took 16-28 ms
        devices.append(device_view(row))
    return {"devices": devices, "next": next_url}


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


@fleet.get("/favicon.ico")
def favicon():
    """What a browser asks for on a page with no icon of its own (the docs, /metrics, a
    JSON answer): none, answered, rather than a 404 in the activity line."""
    return current_app.response_class(status=204)


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


def count_by_status(db: sqlite3.Connection) -> dict:
    """How many of the listed devices are up, down and never heard. Only the few down or
    never heard are counted, along their own indexes; the up ones are the rest."""
    devices = len(current_app.config["DEVICE_KEYS"])
    down, never = db.execute(
        f"SELECT (SELECT count(*) FROM devices WHERE {STATUSES['down']} AND listed),"
        f" (SELECT count(*) FROM devices WHERE {STATUSES['never']} AND listed)"
    ).fetchone()
    return {"devices": devices, "up": devices - down - never, "down": down, "never": never}


def init_app(app: Flask) -> None:
    # A filter searches the listed ids folded once, not on every page: over 100,000 ids,
    # folding them took 5.3 ms a page, and SQLite's LIKE 10-17 ms. Each device's key with
    # its folded id, in id order.
    folded_ids = app.config["FOLDED_IDS"] = {key: device_id.casefold()
                                             for device_id, key in app.config["DEVICE_KEYS"].items()}

    # Which devices a filter matches never changes while fleetmon runs, and a tab that
    # shows one reloads it every 2 s: remembered, the few lately asked for skip the pass
    # over every id, 6-20 ms of the page at 100,000 devices.
    @functools.lru_cache(maxsize=FILTERS_REMEMBERED)
    def matching(needle: str) -> tuple[int, ...]:
        return tuple(key for key, folded_id in folded_ids.items() if needle in folded_id)

    app.extensions["fleet.matching"] = matching
    app.register_blueprint(fleet)


def read_fleet_page(db: sqlite3.Connection, text: str, page: int) -> tuple[dict, int, int, list[sqlite3.Row]]:
    """The counts, the page (past the end: the last), the number of pages, and the rows
    of that page of the listed devices, or of those whose id contains text in any case.

    The whole fleet comes in the order of its index, which a page walks from whichever
    end is nearer. A filter's matches come down first, longest down first, then up, then
    never heard, each by id: found in memory, a page costs at most a pass over them. In
    the index's order they would cost a walk of it, with a look at each device's row:
    40-160 ms at 100,000 devices (benchmark.py).
    """
    if not text:
        counts = count_by_status(db)
        page, pages, offset = page_of(page, counts["devices"])
        return counts, page, pages, walk_by_concern(db, offset, counts["devices"])
    matches, down, never = matches_by_status(db, text.casefold())
    counts = {"devices": len(matches), "up": len(matches) - len(down) - len(never), "down": len(down), "never": len(never)}
    page, pages, offset = page_of(page, counts["devices"])
    not_up = never.union(down)
    # Only as far along the matches as the page: the first pages, which tabs show, cost little.
    in_order = chain(down, (key for key in matches if key not in not_up), (key for key in matches if key in never))
    page_keys = list(islice(in_order, offset, offset + FLEET_PAGE_ROWS))
    by_key = {row["device_key"]: row for row in db.execute(
        "SELECT * FROM devices WHERE device_key IN (SELECT value FROM json_each(?))", (json.dumps(page_keys),))}
    return counts, page, pages, [by_key[key] for key in page_keys]


def matches_by_status(db: sqlite3.Connection, needle: str) -> tuple[tuple[int, ...], list[int], set[int]]:
    """The keys of the listed devices whose folded id contains needle, in id order; of
    those, the down ones, longest down first; and those never heard."""
    folded_ids = current_app.config["FOLDED_IDS"]
    # The few never heard and down, from their small indexes alone; never heard comes
    # first, as status_of() has it.
    never = {key for (key,) in db.execute(f"SELECT device_key FROM devices WHERE {STATUSES['never']} AND listed")
             if needle in folded_ids[key]}
    down_since = db.execute(f"SELECT device_key, down_since_ms FROM devices WHERE {STATUSES['down']} AND listed")
    # Longest down first; those down since the same moment by id, case folded.
    down = [key for _, _, key in sorted((since, folded_ids[key], key) for key, since in down_since
                                         if needle in folded_ids[key] and key not in never)]
    return current_app.extensions["fleet.matching"](needle), down, never


def page_of(page: int, devices: int) -> tuple[int, int, int]:
    """The page asked for, or the last if it is past the end; the number of pages; and
    how many devices come before the page."""
    pages = max(1, math.ceil(devices / FLEET_PAGE_ROWS))
    page = min(page, pages)
    return page, pages, (page - 1) * FLEET_PAGE_ROWS


def walk_by_concern(db: sqlite3.Connection, offset: int, devices: int) -> list[sqlite3.Row]:
    """The page of the listed devices that begins at offset, in the fleet page's order,
    walked along the index from whichever end is nearer: the last page of 100,000
    devices took 15 ms from the front."""
    after = devices - offset - FLEET_PAGE_ROWS  # how many come after the page
    if offset <= max(0, after):
        return db.execute(f"SELECT * FROM devices INDEXED BY devices_by_concern WHERE listed"
                          f" ORDER BY {BY_CONCERN} LIMIT ? OFFSET ?", (FLEET_PAGE_ROWS, offset)).fetchall()
    rows = db.execute(f"SELECT * FROM devices INDEXED BY devices_by_concern WHERE listed"
                      f" ORDER BY {BACKWARDS} LIMIT ? OFFSET ?", (FLEET_PAGE_ROWS + min(0, after), max(0, after))).fetchall()
    return rows[::-1]


def fleet_page(text: str, page: int) -> str:
    give_way_to_devices()
    db = get_db()
    counts, page, pages, rows = read_fleet_page(db, text, page)
    now = now_ms()
    shown = []
    for row in rows:
        give_way_to_devices()
        shown.append(device_row(db, row, now, FLEET_STRIP_MINUTES, FLEET_STRIP_CELL_MINUTES))

    def page_url(number: int) -> str | None:
        return url_for(".index", page=number, q=text or None) if 1 <= number <= pages else None

    return render_template(
        "fleet.html", counts=counts, q=text, page=page, pages=pages, rows=shown,
        prev_url=page_url(page - 1), next_url=page_url(page + 1), keep_days=current_app.config["KEEP_DAYS"],
    )


@fleet.get("/devices/<device_id>")
def device_page(device_id: str):
    db = get_db()
    device = read_device(db, device_id)

    def html() -> str:
        now = now_ms()
        outages = [{**outage_view(started, ended),
                    "lasted": human_duration((ended - started) * 1_000_000) if ended is not None
                    else f"{human_duration((now - started) * 1_000_000)} so far"}
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
        # A database upgraded from a fleetmon that kept no status holds devices that sent
        # telemetry before it began keeping status.
        since = "not heard since fleetmon began keeping status" if has_sent(aggregates_of(device)) else ""
    elif status == "down":
        since = f"for {human_duration((now - device['down_since_ms']) * 1_000_000)}"
    else:
        since = f"last heard {human_duration((now - device['last_heard_ms']) * 1_000_000)} ago"
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


