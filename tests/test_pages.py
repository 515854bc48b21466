"""What an operator reads (fleet.py, docs.py, debug.py): the fleet's API, the fleet page
and a page per device, the root, the API's document and its docs page, and the debug views.
"""

import json
import re
import sqlite3
import urllib.parse
from contextlib import closing

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleet
from conftest import (
    DEVICE,
    HERE,
    HTML,
    OTHER_DEVICE,
    SENT_AT,
    WallClock,
    check_after,
    device_json,
    devices_file,
    fleet_page,
    heartbeat,
    listed_ids,
    minute_of_day,
    open_app,
    query,
    restarted,
    send,
    send_day,
    stats_url,
    strips,
    summary,
    upload,
    watching,
)
from fleetmon import uptime_percent
from simulator import PUBLISHED_DAYS, simulated_day

# --- The fleet's API ----------------------------------------------------------------------


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


@pytest.mark.parametrize("path", ["/debug/devices", "/api/v1/devices"])
@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1", "²", "9" * 5000])
def test_a_list_limit_is_1_to_1000(client, path, limit):
    response = client.get(f"{path}?limit={limit}")
    assert (response.status_code, response.get_json()) == (400, {"msg": "limit must be a whole number from 1 to 1000"})


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
        assert '<span class="pill down">down</span> <span class="since">for 2 min 1 s</span>' in text
        assert "<td>still down</td>" in text and '<td class="num">2 min 1 s so far</td>' in text  # its open outage
        assert client.get(f"/devices/{DEVICE}").get_json() == device_json(client)
        send(client, heartbeat(minute_of_day(500)))  # heard again: the outage ends
        assert '<td class="num">2 min 1 s</td>' in client.get(f"/devices/{DEVICE}", headers=HTML).get_data(as_text=True)
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


def test_the_root_says_what_this_is(client):
    response = client.get("/")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.get_json() == {"name": "fleetmon", "version": "1.0.0", "devices": 5, "links": {
        "fleet_page": "/", "devices": "/api/v1/devices", "metrics": "/metrics", "docs": "/docs/",
        "openapi": "/openapi.json", "example_stats": "/api/v1/devices/18-b8-87-e7-1f-06/stats"}}
    assert client.get(response.get_json()["links"]["example_stats"]).status_code == 204


def test_a_browser_asking_for_an_icon_is_answered_none(client):
    """The pages carry their own icon; the docs, /metrics and JSON answers none, and a
    browser showing them asks for /favicon.ico: an empty answer, not a 404 to count."""
    response = client.get("/favicon.ico")
    assert (response.status_code, response.data) == (204, b"")


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
    assert page.count('<td><span class="pill never">never heard</span>') == 2
    assert '<span title="3m21.858747766s (exact, over 1 uploads)">3 min 22 s</span>' in page
    assert '<span class="pct">20.000 %</span>' in page


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
    assert '<span class="pill down">down</span> <span class="since">for 2 min</span>' in page
    assert '<span class="pill down">down</span> <span class="since">for 1 min 30 s</span>' in page
    assert '<span class="since">last heard 30 s ago</span>' in page


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


def test_online_quarters_count_the_minutes_of_each_quarter_hour_in_the_span():
    full = (1 << 60) - 1
    assert fleet.online_quarters({0: 0b111, 1: 1 << 59}, 2, 119) == (2, "10000001")
    # 0:30-0:59 missed, 1:00-2:59 online, 3:00-3:05 missed
    assert fleet.online_quarters({1: full, 2: full}, 30, 185) == (120, "00ffffffff0")
    assert fleet.online_quarters({0: full}, 7, 22) == (16, "88")  # 7-14 and 15-22
    assert fleet.online_quarters({-1: full}, -1, -1) == (1, "1")  # before 1970
    assert fleet.online_quarters({}, 5, 9) == (0, "0")


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
        everyone = fleet_page(client, "?q=CA")  # every device matches: the one heard, then the rest by id
        assert (listed_ids(everyone), summary(everyone)["Matching devices"]) == (listed_ids(pages[0]), "120")
        assert listed_ids(fleet_page(client, "?q=CAMÉRA-SS")) == ["caméra-ß"]  # case folded, not only ASCII
        assert listed_ids(fleet_page(client, "?q=cam_0")) == listed_ids(fleet_page(client, "?q=%25")) == []
        assert listed_ids(fleet_page(client, "?page=9")) == listed_ids(pages[2])  # past the end: the last
        assert client.get("/?page=0", headers=HTML).status_code == 400
        assert client.get("/?q=" + "x" * 201, headers=HTML).get_json() == {"msg": "q must be at most 200 characters"}


def test_the_fleet_page_and_list_give_way_to_the_devices_before_each_row(tmp_path):
    """Served by waitress, they wait at each of these steps while a device's request is
    being served (connections.Lanes.give_way): the page before it reads too."""
    devices = devices_file(tmp_path, *(f"cam-{n:03d}" for n in range(60)))
    with open_app(tmp_path / "fleet.db", devices) as app:
        client = app.test_client()
        steps = []
        app.extensions["connections.give_way"] = lambda: steps.append("gave way")
        assert len(listed_ids(fleet_page(client))) == 50
        assert len(steps) == 1 + 50
        steps.clear()
        assert len(listed_ids(fleet_page(client, "?q=cam-05"))) == 10
        assert len(steps) == 1 + 10
        steps.clear()
        assert len(client.get("/api/v1/devices?limit=20").get_json()["devices"]) == 20
        assert len(steps) == 20


def test_a_filters_matches_come_down_first_then_up_then_never_heard_each_by_id(tmp_path, monkeypatch):
    wall = WallClock(monkeypatch)
    fleet_ids = [f"cam-{n}" for n in range(1, 10)] + ["dog-1"]
    with open_app(tmp_path / "fleet.db", devices_file(tmp_path, *fleet_ids)) as first, \
            restarted(first, devices_file(tmp_path, *fleet_ids, "cam-0", "cam-00", name="more.csv")) as app:
        client = app.test_client()  # cam-0 and cam-00, listed last, have the highest keys
        with watching(app, down_after=60) as watched:
            send(client, heartbeat(SENT_AT, "cam-7"), heartbeat(SENT_AT, "cam-0"))  # down at the same moment
            send(client, heartbeat(minute_of_day(0), "cam-5"), heartbeat(minute_of_day(10), "cam-5"))  # uptime 20 %
            for heard in (["cam-2", "cam-5", "cam-1", "dog-1"], ["cam-5", "cam-1", "dog-1"], ["cam-5", "cam-1"]):
                wall.ms += 30_000  # cam-7 and cam-0 are down at 60 s, cam-2 at 90 s
                check_after(watched, 30)
                send(client, *(heartbeat(SENT_AT, device_id) for device_id in heard))
            in_order = ["cam-0", "cam-7", "cam-2", "cam-1", "cam-5",
                        "cam-00", "cam-3", "cam-4", "cam-6", "cam-8", "cam-9"]
            filtered = fleet_page(client, "?q=CAM")
            assert listed_ids(filtered) == in_order
            assert "Matching devices: down first, longest down first; then up, then never heard, each by id." in filtered
            assert summary(filtered) == {"Matching devices": "11", "Down": "3", "Up": "2", "Never heard": "6"}
            assert listed_ids(fleet_page(client))[3:5] == ["cam-5", "cam-1"]  # unfiltered: the worst uptime first
            monkeypatch.setattr(fleet, "FLEET_PAGE_ROWS", 4)
            assert [listed_ids(fleet_page(client, f"?q=cam&page={page}")) for page in (1, 2, 3, 4)] == [
                in_order[:4], in_order[4:8], in_order[8:], in_order[8:]]  # past the end: the last
        # The ids were searched once for "cam", and remembered for the pages after.
        assert app.extensions["fleet.matching"].cache_info()[:2] == (4, 1)  # hits, misses


def test_the_fleet_page_walks_its_index_from_the_nearer_end(tmp_path, monkeypatch):
    with open_app(tmp_path / "fleet.db", devices_file(tmp_path, *(f"cam-{n:02d}" for n in range(11)))) as app:
        client = app.test_client()
        for n in range(0, 11, 2):
            send(client, *(heartbeat(minute_of_day(minute), f"cam-{n:02d}") for minute in range(0, n + 2, 2)))
        in_order = [device_id for (device_id,) in query(app, f"SELECT device_id FROM devices ORDER BY {fleet.BY_CONCERN}")]
        statements, get_db = [], fleet.get_db

        def traced_db():
            db = get_db()
            db.set_trace_callback(statements.append)
            return db

        monkeypatch.setattr(fleet, "get_db", traced_db)
        monkeypatch.setattr(fleet, "FLEET_PAGE_ROWS", 3)
        pages, backwards = [], []
        for page in (1, 2, 3, 4, 5):
            statements.clear()
            pages.append(listed_ids(fleet_page(client, f"?page={page}")))
            backwards.append(any(fleet.BACKWARDS in statement for statement in statements))
        assert pages == [in_order[:3], in_order[3:6], in_order[6:9], in_order[9:], in_order[9:]]
        assert backwards == [False, False, True, True, True]


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
    # The down and the never-heard devices counted in their own small indexes, which hold
    # them alone, with no read of the table...
    assert re.search(r"(SCAN|SEARCH) devices USING COVERING INDEX devices_down\b", counts)
    assert re.search(r"(SCAN|SEARCH) devices USING COVERING INDEX devices_never_heard\b", counts)
    # ...and a page of rows a walk along the page's order, with no sort of the whole fleet.
    assert "SCAN devices USING INDEX devices_by_concern" in rows and "TEMP B-TREE" not in rows


# A query argument of any kind and length, the pages' own and others.
query_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30) | st.from_regex(r"-?\d{1,5000}", fullmatch=True)


@given(path=st.sampled_from(["/", "/api/v1/devices", "/debug/devices", f"/devices/{DEVICE}"]),
       arguments=st.dictionaries(st.sampled_from(["page", "limit", "after", "status", "q"]), query_text, max_size=3),
       accept=st.sampled_from(["text/html", "application/json"]))
def test_no_query_argument_reaches_a_500(client, path, arguments, accept):
    response = client.get(path, query_string=arguments, headers={"Accept": accept})
    assert response.status_code in (200, 400), (path, arguments, response.status_code)
    if response.status_code == 400:
        assert set(response.get_json()) == {"msg"}


# --- The API's document and its docs page -------------------------------------------------


def test_openapi_json_is_the_shipped_file_whatever_the_host_it_is_reached_by(client):
    for host in ("localhost", "127.0.0.1:6733", "[::1]:6733", "192.0.2.1"):
        response = client.get("/openapi.json", headers={"Host": host})
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
    assets = re.findall(r'(?:src|href)="/docs/([^"]+)"', html)
    assert set(assets) == {"swagger-ui.css", "favicon-32x32.png", "swagger-ui-bundle.js",
                           "swagger-ui-standalone-preset.js"}
    for asset in assets:
        with client.get(f"/docs/{asset}") as response:  # a file sent as it is read: closed after
            assert response.status_code == 200
    assert "http://" not in html and "https://" not in html  # nothing from the network


# --- The debug views ----------------------------------------------------------------------


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


def test_the_counts_lead_with_what_matters_and_colour_down_only_when_some_are(app, client):
    page = fleet_page(client)
    assert list(summary(page)) == ["Down", "Up", "Never heard", "Devices"]
    assert 'class="down"' not in page.split('<dl class="summary"')[1].split("</dl>")[0]
    with closing(sqlite3.connect(app.config["DATABASE"], isolation_level=None)) as db:
        db.execute("UPDATE devices SET last_heard_ms = 1000, down_since_ms = 1000 WHERE device_id = ?", (DEVICE,))
    assert '<div class="down"><dt>Down</dt><dd>1</dd></div>' in fleet_page(client)


def test_a_device_never_heard_reads_so_once_and_one_that_sent_before_status_was_kept_says_so(app, client):
    """A database upgraded from a fleetmon that kept no status holds devices with
    telemetry that this fleetmon has never heard."""
    with closing(sqlite3.connect(app.config["DATABASE"], isolation_level=None)) as db:
        db.execute("UPDATE devices SET online_minutes = 2, first_minute = 0, last_minute = 1 WHERE device_id = ?",
                   (OTHER_DEVICE,))
    page = fleet_page(client)
    rows = dict(re.findall(r"<code>([^<]*)</code></a></th>\s*<td>(.*?)</td>", page))
    assert rows[DEVICE].count("never heard") == 1
    assert " ".join(re.sub(r"<[^>]+>", "", rows[OTHER_DEVICE]).split()) == \
        "never heard not heard since fleetmon began keeping status"
    assert "not heard since this fleetmon began keeping status" in page  # the legend says the same
