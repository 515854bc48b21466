"""Who is down (status.py), saying so (alerts.py: the server window's lines and the alert
URL), the housekeeping that runs both beside the server (housekeeping.py), and what
Prometheus reads of it all (metrics.py).

Clocks are the tests': the watch's monotonic one moved by check_after(), fleetmon's wall
clock by WallClock; a receiver's answers are a FakeServer's.
"""

import re
import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing, contextmanager
from http.client import HTTPConnection

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

import alerts
import fleetmon
import housekeeping
import metrics
import status
from conftest import (
    DEVICE,
    OTHER_DEVICE,
    SENT_AT,
    FakeServer,
    WallClock,
    alert_receiver,
    check_after,
    device_json,
    devices_file,
    heartbeat,
    heartbeat_url,
    http_answer,
    http_request,
    query,
    restarted,
    send,
    server_process,
    unused_port,
    upload,
    watching,
)

# --- Who is down --------------------------------------------------------------------------


def test_a_device_not_heard_for_the_down_after_time_is_down_and_up_again_when_heard(app, client, monkeypatch):
    wall = WallClock(monkeypatch)  # 10:04:00, moved on with the watch's clock

    def after(seconds):
        wall.ms += int(seconds * 1000)
        return check_after(watched, seconds)

    with watching(app, down_after=60) as watched:
        assert device_json(client)["status"] == "never"
        send(client, heartbeat(SENT_AT))
        heard = device_json(client)
        assert (heard["status"], heard["last_heard"], heard["down_since"], heard["outages"]) == (
            "up", "2024-01-01T10:04:00.000Z", None, [])
        assert after(59.9) == 0
        assert after(0.1) == 1
        down = device_json(client)
        assert (down["status"], down["down_since"]) == ("down", heard["last_heard"])
        assert down["outages"] == [{"started": heard["last_heard"], "ended": None, "seconds": None}]
        assert after(600) == 0  # said once

        send(client, upload(5))  # an upload is heard too: up again in the statement that stores it
        up = device_json(client)
        assert (up["status"], up["down_since"], up["last_heard"]) == ("up", None, "2024-01-01T10:15:00.000Z")
        assert up["outages"] == [{"started": heard["last_heard"], "ended": up["last_heard"], "seconds": 660.0}]
        assert watched.lines == [f"fleetmon: {DEVICE} is down (last heard 10:04:00 UTC, 1 min ago)"]
        after(0)  # the next round tells it
    assert watched.lines[1:] == [f"fleetmon: {DEVICE} is up again after 11 min"]
    assert query(app, "SELECT status, at_ms - last_heard_ms FROM alerts ORDER BY id") == [("down", 60_000),
                                                                                          ("up", 660_000)]


def test_after_a_restart_no_device_is_down_before_the_down_after_time_and_unlisted_ones_never(app, client, tmp_path):
    send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE))  # heard, then fleetmon stops a long while
    with restarted(app, devices_file(tmp_path, OTHER_DEVICE)) as again, \
            closing(fleetmon.connect(again.config["DATABASE"])) as db:  # with a devices file without DEVICE
        watch = status.Watch(db, 60, 50_000.0, announce=[].append)
        assert watch.check(db, 50_059.0, fleetmon.now_ms()) == 0
        assert device_json(again.test_client(), OTHER_DEVICE)["status"] == "up"
        assert watch.check(db, 50_060.0, fleetmon.now_ms()) == 1
        assert device_json(again.test_client(), OTHER_DEVICE)["status"] == "down"
        assert watch.check(db, 90_000.0, fleetmon.now_ms()) == 0
    assert query(app, "SELECT device_id, down_since_ms IS NOT NULL FROM devices WHERE device_id IN (?, ?)"
                      " ORDER BY device_id", (DEVICE, OTHER_DEVICE)) == [(DEVICE, 0), (OTHER_DEVICE, 1)]


def test_a_device_heard_again_before_it_is_declared_down_stays_up(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT))
        first_heard = wall.ms
        wall.ms += 1_000
        send(client, heartbeat(SENT_AT))  # heard again just after the watch took its deadline
        assert status.mark_down(watched.db, DEVICE, first_heard, wall.ms + 60_000) is False
        assert device_json(client)["status"] == "up" and watched.lines == []


def test_a_device_the_watch_failed_to_declare_down_is_first_in_line_at_the_next_check(app, client, monkeypatch):
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE))
        real_mark_down = status.mark_down

        def disk_full(*args):
            send(client, heartbeat(SENT_AT, OTHER_DEVICE))  # heard meanwhile, from a request: due from now
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(status, "mark_down", disk_full)
        with pytest.raises(sqlite3.OperationalError):
            check_after(watched, 60)
        monkeypatch.setattr(status, "mark_down", real_mark_down)
        assert check_after(watched, 0) == 1
        assert (device_json(client)["status"], device_json(client, OTHER_DEVICE)["status"]) == ("down", "up")
        assert check_after(watched, 60) == 1


# --- Alerts -------------------------------------------------------------------------------


def test_alerts_are_delivered_in_order_and_retried_with_backoff_after_a_failure(app, client, monkeypatch):
    wall = WallClock(monkeypatch)
    with watching(app, down_after=60) as watched:
        send(client, heartbeat(SENT_AT))
        wall.ms += 300_000
        check_after(watched, 60)
        wall.ms += 132_000
        send(client, heartbeat(SENT_AT))
        check_after(watched, 0)
    assert watched.lines == [f"fleetmon: {DEVICE} is down (last heard 10:04:00 UTC, 5 min ago)",
                             f"fleetmon: {DEVICE} is up again after 7 min 12 s"]
    lines, outcomes = [], Counter()
    port = unused_port()
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        delivery = alerts.AlertDelivery(f"http://127.0.0.1:{port}/hook/secret", lines.append, outcomes)
        assert delivery.step(db, monotonic_now=10) == 0
        assert delivery.step(db, monotonic_now=10.5) == 0  # not before its retry is due
        assert delivery.step(db, monotonic_now=11) == 0
        assert [re.sub(r"…: .*;", "…: (why);", line) for line in lines] == [
            f"fleetmon: alert 1 ({DEVICE} down) not delivered to http://127.0.0.1:{port}/…: (why); trying again in 1 s",
            f"fleetmon: alert 1 ({DEVICE} down) not delivered to http://127.0.0.1:{port}/…: (why); trying again in 2 s",
        ]
        with alert_receiver() as (url, taken, _):
            delivery.url = url
            assert delivery.step(db, monotonic_now=13) == 2
            assert delivery.step(db, monotonic_now=14) == 0  # each delivered once
    assert outcomes == Counter(delivered=2)
    assert taken == [
        {"id": 1, "device_id": DEVICE, "status": "down", "at": "2024-01-01T10:09:00.000Z",
         "silent_since": "2024-01-01T10:04:00.000Z", "outage_seconds": None,
         "text": f"fleetmon: `{DEVICE}` is down (last heard 10:04:00 UTC, 5 min ago)"},
        {"id": 2, "device_id": DEVICE, "status": "up", "at": "2024-01-01T10:11:12.000Z",
         "silent_since": "2024-01-01T10:04:00.000Z", "outage_seconds": 432.0,
         "text": f"fleetmon: `{DEVICE}` is up again after 7 min 12 s"},
    ]


def queue_alerts(app, *statuses):
    """Alerts for DEVICE, queued as the watch queues them."""
    with closing(fleetmon.connect(app.config["DATABASE"])) as db, fleetmon.transaction(db):
        for alert_status in statuses:
            alerts.queue(db, app.config["DEVICE_KEYS"][DEVICE], alert_status, 1_704_103_740_000, 1_704_103_440_000)


@contextmanager
def delivering(app, url):
    """An AlertDelivery to url; yields step(monotonic_now=0.0), the lines it told and its outcomes."""
    lines, outcomes = [], Counter()
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        delivery = alerts.AlertDelivery(url, lines.append, outcomes)
        yield (lambda monotonic_now=0.0: delivery.step(db, monotonic_now)), lines, outcomes


def delivered(app):
    return [outcome for (outcome,) in query(app, "SELECT delivered FROM alerts ORDER BY id")]


def test_an_alert_follows_307_and_308_which_keep_the_post(app):
    queue_alerts(app, "down")

    def answer(method, path):
        return {"/hook": http_answer(307, headers=[("Location", "/moved?x=1")]),
                "/moved?x=1": http_answer(308, headers=[("Location", f"{receiver.url}/final")]),
                "/final": http_answer(200, b"{}")}[path]

    with FakeServer(answer) as receiver, delivering(app, f"{receiver.url}/hook") as (step, lines, outcomes):
        assert step() == 1
    assert receiver.requests == [("POST", "/hook"), ("POST", "/moved?x=1"), ("POST", "/final")]
    assert (lines, outcomes, delivered(app)) == ([], Counter(delivered=1), [alerts.DELIVERED])


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (http_answer(302, headers=[("Location", "https://elsewhere.example/x")]),
         "HTTP 302, a redirect to https://elsewhere.example/…, which would not keep the POST"),
        (http_answer(301, headers=[("Location", "/new")]), "HTTP 301, a redirect to {url}/…, which would not keep the POST"),
        (http_answer(303), "HTTP 303, a redirect to nowhere, which would not keep the POST"),
        (http_answer(500, b"{}"), "HTTP 500"),
        (http_answer(408), "HTTP 408"),  # 4xx that say "later"
        (http_answer(429), "HTTP 429"),
        (b"", "Remote end closed connection without response"),
    ],
)
def test_an_alert_not_taken_is_tried_again_after_a_backoff_and_the_ones_after_it_wait(app, answer, why):
    queue_alerts(app, "down", "up")
    with FakeServer(lambda method, path: answer) as receiver, \
            delivering(app, f"{receiver.url}/hook") as (step, lines, outcomes):
        assert step(10.0) == 0
        assert step(10.5) == 0  # not due yet: not tried
    why = why.format(url=receiver.url)
    assert lines == [f"fleetmon: alert 1 ({DEVICE} down) not delivered to {receiver.url}/…: {why}; trying again in 1 s"]
    assert (len(receiver.requests), outcomes, delivered(app)) == (1, Counter(), [alerts.WAITING] * 2)


def test_what_a_receiver_answers_stays_on_the_one_line_of_its_failure(app):
    queue_alerts(app, "down")
    with FakeServer(lambda method, path: b"SSH-2.0-OpenSSH_9.6\r\n") as receiver, \
            delivering(app, f"{receiver.url}/hook") as (step, lines, _):
        assert step() == 0
    assert lines and not any(character in lines[0] for character in "\r\n")


@pytest.mark.parametrize("refusal", [400, 401, 404, 410, 413])
def test_an_alert_the_receiver_refuses_is_kept_marked_refused_and_the_next_one_goes(app, refusal):
    queue_alerts(app, "down", "up")
    answers = iter([http_answer(refusal, b'{"error": "no such hook"}'), http_answer(204)])
    with FakeServer(lambda method, path: next(answers)) as receiver, \
            delivering(app, f"{receiver.url}/hook") as (step, lines, outcomes):
        assert step() == 1
        assert step() == 0  # and not sent again
    assert lines == [(f"fleetmon: alert 1 ({DEVICE} down) refused by {receiver.url}/…: HTTP {refusal}; "
                      "it is kept, and not sent again")]
    assert (len(receiver.requests), outcomes) == (2, Counter(refused=1, delivered=1))
    assert delivered(app) == [alerts.REFUSED, alerts.DELIVERED]


def dripping(stop, head, drop):
    """An answer that never ends, a drop of it every 50 ms: each read of it is short."""
    yield head
    while not stop.wait(0.05):
        yield drop


# Cut short by the watchdog, an answer after its status line reads as a whole one: http.client
# ends a head at EOF, and read(amt) returns a short body without complaint.
@pytest.mark.parametrize("drip", [
    (b"HTTP/1.1", b" "),  # its status line
    (b"HTTP/1.1 200 OK\r\n", b"X-Drip: x\r\n"),  # its head
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x"),  # its body
], ids=["status line", "head", "body"])
def test_a_receiver_dripping_its_answer_cannot_hold_delivery_past_the_attempts_time(app, monkeypatch, drip):
    monkeypatch.setattr(alerts, "ATTEMPT_SECONDS", 0.2)
    queue_alerts(app, "down")
    stop = threading.Event()
    with FakeServer(lambda method, path: dripping(stop, *drip)) as receiver:
        try:
            with delivering(app, f"{receiver.url}/hook") as (step, lines, _):
                assert step() == 0
        finally:
            stop.set()
    assert lines == [(f"fleetmon: alert 1 ({DEVICE} down) not delivered to {receiver.url}/…: "
                      "no answer within 0.2 s; trying again in 1 s")]
    assert delivered(app) == [alerts.WAITING]


def test_a_stopping_fleetmon_ends_the_attempt_under_way_and_begins_none(app, monkeypatch):
    monkeypatch.setattr(alerts, "ATTEMPT_SECONDS", 3600)  # only stop() can end it
    queue_alerts(app, "down")
    asked, stop = threading.Event(), threading.Event()

    def answer(method, path):  # and then nothing, until the test ends
        asked.set()
        return iter(lambda: stop.wait() and b"", b"")

    lines = []
    with FakeServer(answer) as receiver, closing(fleetmon.connect(app.config["DATABASE"])) as db:
        delivery = alerts.AlertDelivery(f"{receiver.url}/hook", lines.append)
        stepping = threading.Thread(target=delivery.step, args=(db, 0.0))
        try:
            stepping.start()
            assert asked.wait(timeout=30)
            delivery.stop()
            stepping.join(timeout=30)
            assert not stepping.is_alive(), "the attempt went on"
        finally:
            stop.set()
        delivery.next_attempt = 0.0
        delivery.step(db, 0.0)  # begins none
    assert len(receiver.requests) == 1
    assert [line.split(": ", 2)[-1] for line in lines[1:]] == ["fleetmon is stopping; trying again in 2 s"]


def test_a_receiver_redirecting_for_ever_is_told_as_such(app):
    queue_alerts(app, "down")
    with FakeServer(lambda method, path: http_answer(307, headers=[("Location", "/hook")])) as receiver, \
            delivering(app, f"{receiver.url}/hook") as (step, lines, _):
        assert step() == 0
    assert len(receiver.requests) == alerts.MAX_REDIRECTS + 1
    assert "would not keep the POST" not in lines[0]


def test_without_an_alert_url_an_alert_is_delivered_by_having_been_told(app):
    queue_alerts(app, "down", "up")
    with delivering(app, None) as (step, lines, outcomes):
        assert step() == 2
    assert (lines, outcomes, delivered(app)) == ([], Counter(delivered=2), [alerts.DELIVERED] * 2)


def test_an_alert_not_delivered_before_kill_9_is_delivered_after_the_restart(tmp_path):
    database = tmp_path / "fleetmon.db"
    nowhere = unused_port()
    with server_process("--port", "0", "--db", str(database), "--down-after", "0.2s",
                        "--alert-url", f"http://127.0.0.1:{nowhere}/hook/secret") as (_, port, _, wait_for):
        with closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
            assert http_request(connection, "POST", heartbeat_url(), {"sent_at": SENT_AT})[0] == 204
        assert wait_for("is down").startswith(f"fleetmon: {DEVICE} is down (last heard ")
        assert wait_for("not delivered").startswith(
            f"fleetmon: alert 1 ({DEVICE} down) not delivered to http://127.0.0.1:{nowhere}/…: ")
    with alert_receiver() as (url, taken, arrived), \
            server_process("--port", "0", "--db", str(database), "--alert-url", url):
        assert arrived.wait(timeout=60)
    assert [(alert["id"], alert["device_id"], alert["status"]) for alert in taken] == [(1, DEVICE, "down")]


# --- The housekeeping ---------------------------------------------------------------------


@contextmanager
def housekeeping_of(app):
    """The app's housekeeping, its threads not started: the test runs its rounds. Yields
    it and the lines it told."""
    lines = []
    keeping = housekeeping.Housekeeping(app, announce=lines.append)
    try:
        yield keeping, lines
    finally:
        keeping.close()


def test_a_failing_duty_is_logged_in_full_once_a_kind_and_the_others_go_on(app, client, caplog, monkeypatch):
    wall = WallClock(monkeypatch)
    with housekeeping_of(app) as (keeping, lines):
        disk, locked = sqlite3.OperationalError("disk I/O error"), sqlite3.OperationalError("database is locked")
        failures, real_check = iter([disk, disk, locked, None, disk]), keeping.watch.check

        def check_failing(*args):
            failure = next(failures)
            if failure is None:
                return real_check(*args)
            raise failure

        monkeypatch.setattr(keeping.watch, "check", check_failing)
        send(client, heartbeat(SENT_AT))
        with closing(fleetmon.connect(app.config["DATABASE"])) as db:  # down, by another hand
            assert status.mark_down(db, DEVICE, wall.ms, wall.ms + 60_000)
        wall.ms += 120_000
        send(client, heartbeat(SENT_AT))  # and up again
        for monotonic_now in (0.0, 1.0, 2.0, 3.0, 4.0):
            keeping.round(monotonic_now, wall.ms)
        assert keeping.next_checkpoint == housekeeping.CHECKPOINT_SECONDS  # it ran in the first round
    # A failure as it begins, in full the first time of its kind; not again while it goes on alike.
    logged = [(record.levelname, record.getMessage(), record.exc_info is not None) for record in caplog.records
              if record.name == "fleetmon"]
    assert logged == [("ERROR", "status failed: OperationalError: disk I/O error", True),
                      ("ERROR", "status failed: OperationalError: database is locked", True),
                      ("WARNING", "status works again", False),
                      ("ERROR", "status failed: OperationalError: disk I/O error", False)]
    assert lines == [f"fleetmon: {DEVICE} is down (last heard 10:04:00 UTC, 1 min ago)",
                     f"fleetmon: {DEVICE} is up again after 2 min"]
    assert app.extensions["fleetmon.alert_outcomes"] == Counter(down=1, up=1)


def test_the_housekeeping_runs_until_closed(app, client):
    with housekeeping_of(app) as (keeping, _):
        keeping.start()
        assert all(thread.is_alive() for thread in keeping.threads)
    assert not any(thread.is_alive() for thread in keeping.threads)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        keeping.db.execute("SELECT 1")


# --- /metrics -----------------------------------------------------------------------------


def scrape(client):
    response = client.get("/metrics")
    assert (response.status_code, response.content_type) == (200, prometheus_client.CONTENT_TYPE_LATEST)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for sample in family.samples}


def test_metrics_are_prometheus_text_naming_each_device_only_in_a_small_fleet(app, client, monkeypatch):
    with housekeeping_of(app) as (keeping, _):
        send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE), upload(5))
        keeping.round(time.monotonic() + 300, fleetmon.now_ms())  # both unheard for the down-after time
        send(client, heartbeat(SENT_AT))  # one of them up again
        keeping.round(time.monotonic(), fleetmon.now_ms())
        client.post(heartbeat_url(), data=b"{")
        samples = scrape(client)
        keeping.delivery.step(keeping.delivery_db, 0.0)  # no alert URL: delivered by having been told
        delivered_after = scrape(client)
    assert {labels: value for (name, labels), value in samples.items() if name == "fleetmon_devices"} == {
        (("status", "up"),): 1, (("status", "down"),): 1, (("status", "never"),): 3}
    # The alerts this process told and sent: a restart starts them again from 0.
    assert {labels: value for (name, labels), value in samples.items() if name == "fleetmon_alerts_total"} == {
        (("status", "down"),): 2, (("status", "up"),): 1}
    assert [samples[("fleetmon_alerts_sent_total", (("outcome", outcome),))] for outcome in ("delivered", "refused")] \
        == [0, 0]
    assert samples[("fleetmon_alerts_waiting", ())] == 3
    assert delivered_after[("fleetmon_alerts_sent_total", (("outcome", "delivered"),))] == 3
    assert delivered_after[("fleetmon_alerts_waiting", ())] == 0
    assert samples[("fleetmon_telemetry_total", (("kind", "heartbeat"),))] == 3
    assert samples[("fleetmon_telemetry_total", (("kind", "upload"),))] == 1
    assert samples[("fleetmon_requests_total", (("endpoint", "api.post_heartbeat"), ("status", "400")))] == 1
    assert {labels: value for (name, labels), value in samples.items() if name == "fleetmon_device_up"} == {
        (("device_id", device_id),): 0 for device_id in app.config["DEVICE_KEYS"]} | {(("device_id", DEVICE),): 1}
    # An uptime only for the devices that sent something: none is no uptime of 0.
    assert {labels: value for (name, labels), value in samples.items() if name == "fleetmon_device_uptime_percent"} \
        == {(("device_id", DEVICE),): 100.0, (("device_id", OTHER_DEVICE),): 100.0}
    monkeypatch.setattr(metrics, "PER_DEVICE_UP_TO", 4)
    text = client.get("/metrics").get_data(as_text=True)
    assert "fleetmon_devices{" in text and "fleetmon_device_up" not in text



def test_the_documented_example_of_metrics_has_the_series_a_scrape_has_in_its_order(app, client):
    send(client, heartbeat(SENT_AT), upload(5, device_id=OTHER_DEVICE))
    scraped = client.get("/metrics").get_data(as_text=True)
    served = client.get("/openapi.json").get_json()["paths"]["/metrics"]["get"]["responses"]["200"]
    example = served["content"]["text/plain"]["example"]

    def series(text):
        return list(dict.fromkeys(sample.name for family in text_string_to_metric_families(text)
                                  for sample in family.samples))

    assert series(example) == series(scraped)


def test_a_scrape_reads_no_history_whatever_its_length(app, client, monkeypatch):
    """Alerts and outages pile up without --keep-days: no statement a scrape runs may read
    them whole. Each reads an index of a few rows, or the listed devices in a small fleet."""
    pool = app.extensions["fleetmon.pool"]
    db = pool.borrow()
    ran = []
    db.set_trace_callback(ran.append)
    pool.give_back(db)
    try:
        assert client.get("/metrics").status_code == 200
    finally:
        db.set_trace_callback(None)
    plans = {statement: " | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}"))
             for statement in ran if statement.startswith("SELECT")}
    assert not any("alerts" in plan and "alerts_to_deliver" not in plan for plan in plans.values()), plans
    assert not any("outages" in plan for plan in plans.values()), plans
    waiting = next(plan for statement, plan in plans.items() if "FROM alerts" in statement)
    assert "USING INDEX alerts_to_deliver" in waiting  # the waiting alerts alone


def test_no_duration_is_negative_across_a_clock_stepped_back(app):
    """The wall clock stepped back between an outage's start and its end."""
    import fleet

    assert fleet.outage_view(started=7_200_000, ended=7_000)["seconds"] == 0
    alert = {"id": 1, "device_id": DEVICE, "status": "up", "at_ms": 7_000, "last_heard_ms": 7_200_000}
    assert alerts.payload(alert)["outage_seconds"] == 0
    assert alerts.text_of(alert) == f"fleetmon: {DEVICE} is up again after 0 ns"
