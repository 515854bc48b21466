"""fleetmon on waitress (connections.py): under concurrent load, its connections kept
open, limited and timed, malformed HTTP answered in JSON; its start with its options and
the mistakes that stop it in one line; and the server window from the start to the stop.

The connection-slot tests drive the server's clocks by hand: it checks its connections
only when a test calls maintenance() (cleanup_interval is an hour), always in the
server's own loop thread (on_loop), and the tests wait for what the server has read,
never for time to pass.
"""

import json
import os
import queue
import re
import select
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from http.client import HTTPConnection

import pytest
import waitress
from flask import Flask, request

import activity
import connections
import fleetmon
import housekeeping
import status
from conftest import (
    DEVICE,
    DEVICES_CSV,
    HERE,
    SENT_AT,
    devices_file,
    fleetmon_command,
    fleetmon_server,
    get,
    heartbeat,
    heartbeat_url,
    http_request,
    minute_of_day,
    open_app,
    query,
    raw_exchange,
    read_to_end,
    running,
    send,
    server_process,
    start_with,
    stats_url,
    stored_minutes,
    upload,
    waitress_server,
)
from simulator import PUBLISHED_DAYS, simulated_day

# --- A real server ------------------------------------------------------------------------


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


def heartbeat_request(minute=0, extra_headers=b""):
    body = json.dumps({"sent_at": minute_of_day(minute)}).encode()
    return (f"POST {heartbeat_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n".encode()
            + extra_headers + b"\r\n" + body)


def test_a_connection_stays_open_after_a_204_until_the_client_asks_to_close(app):
    pipelined = b"".join(heartbeat_request(minute) for minute in range(49))
    with waitress_server(app) as port:  # raw_exchange reads on until the server closes
        answers = raw_exchange(port, pipelined + heartbeat_request(49, extra_headers=b"Connection: close\r\n"))
    responses = answers.split(b"HTTP/1.1 204")[1:]
    assert [b"Connection: close" in response for response in responses] == [False] * 49 + [True]
    assert len(stored_minutes(app)) == 50


def test_stock_waitress_still_closes_the_connection_after_a_204():
    """Stock waitress, without fleetmon's channel, closes after a 204, which
    connections.KeepAliveTask undoes. Of two pipelined requests, the second asking to
    close, a waitress that keeps the connection answers both, one that closes after a 204
    only the first, so the test needs no timeout to tell which."""

    def no_content(environ, start_response):
        start_response("204 No Content", [])
        return []

    server = waitress.create_server(no_content, host="127.0.0.1", port=0)
    with running(server):
        answer = raw_exchange(server.effective_port,
                              heartbeat_request(0) + heartbeat_request(1, extra_headers=b"Connection: close\r\n"))
    assert answer.count(b"HTTP/1.1 204") == 1, (
        "waitress now keeps the connection open after a 204 (upstream pull request Pylons/waitress#502): "
        "delete connections.KeepAliveTask, and this test")
    assert b"Connection: close" in answer


def test_a_device_is_answered_while_a_page_is_still_being_made(app):
    """The devices' requests have a worker of their own: a heartbeat is stored and
    answered while a page holds the other worker."""
    page_begun, page_may_end = threading.Event(), threading.Event()

    def slow_page():
        page_begun.set()
        page_may_end.wait(30)
        return "the page"

    app.add_url_rule("/slow-page", view_func=slow_page)
    with waitress_server(app) as port, closing(HTTPConnection("127.0.0.1", port, timeout=30)) as browser, \
            closing(HTTPConnection("127.0.0.1", port, timeout=10)) as device:
        browser.request("GET", "/slow-page")
        assert page_begun.wait(10)
        try:
            assert http_request(device, "POST", *heartbeat(SENT_AT)) == (204, b"")
            assert http_request(device, "GET", stats_url()) == (200, b'{"avg_upload_time":"0s","uptime":100.0}\n')
            assert not page_may_end.is_set()
        finally:
            page_may_end.set()
        response = browser.getresponse()
        assert (response.status, response.read()) == (200, b"the page")
    assert stored_minutes(app) == [fleetmon.utc_minute(SENT_AT)]


def test_a_devices_request_is_served_holding_the_lock_that_pages_give_way_to(app):
    """A page's Python, beside a device's request, would hold up the devices' worker at
    each step of it: so the device's request is served holding a lock, which the pages
    wait on (connections.Lanes.give_way), and a page's own request is not."""
    held_while_served = {}

    def taken_at_once(lock):
        if lock.acquire(blocking=False):
            lock.release()
            return True
        return False

    def record(what):
        with ThreadPoolExecutor(1) as pages_worker:
            held_while_served[what] = not pages_worker.submit(taken_at_once, server.task_dispatcher.serving_devices).result()
        app.extensions["connections.give_way"]()  # a device's request does not wait for itself
        return "the page"

    app.add_url_rule("/some-page", view_func=lambda: record("a page"))
    app.extensions["fleetmon.heard"].append(lambda device_id, heard_at_ms: record("a heartbeat"))
    with running(fleetmon_server(app)) as server, \
            closing(HTTPConnection("127.0.0.1", server.effective_port, timeout=10)) as client:
        assert app.extensions["connections.give_way"] == server.task_dispatcher.give_way
        assert http_request(client, "GET", "/some-page") == (200, b"the page")
        assert http_request(client, "POST", *heartbeat(SENT_AT)) == (204, b"")
    assert held_while_served == {"a page": False, "a heartbeat": True}


def test_giving_way_is_waiting_for_the_lock_a_devices_request_is_served_holding():
    lanes = connections.Lanes(0)  # no worker: only the lock is wanted

    class Recorded:
        def __init__(self):
            self.steps = []

        def __enter__(self):
            self.steps.append("taken")

        def __exit__(self, *error):
            self.steps.append("let go")

    lanes.serving_devices = Recorded()
    lanes.give_way()
    assert lanes.serving_devices.steps == ["taken", "let go"]


def test_the_devices_requests_are_told_apart_by_their_path(app):
    """The devices' lane serves the contract's three endpoints, the api blueprint's, and
    no other route."""
    urls = app.url_map.bind("127.0.0.1")
    for rule in app.url_map.iter_rules():
        path = urls.build(rule.endpoint, {argument: "cam-1" for argument in rule.arguments})
        assert connections.is_contract_request(path) == rule.endpoint.startswith("api."), path


def test_hundreds_of_idle_and_slow_connections_do_not_lock_clients_out(app):
    with waitress_server(app) as port, ExitStack() as sockets:
        for number in range(400):
            sock = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            if number % 2:
                sock.sendall(b"POST / HTTP/1.1\r\nX-Slow: ")  # a header that never ends
        with closing(HTTPConnection("127.0.0.1", port, timeout=5)) as connection:
            assert http_request(connection, "GET", stats_url()) == (204, b"")


def test_idle_connections_are_dropped_after_channel_timeout(app):
    with waitress_server(app, channel_timeout=1, cleanup_interval=1) as port:
        assert raw_exchange(port, b"") == b""


@pytest.mark.parametrize(
    ("request_bytes", "status", "msg"),
    [
        (b"GARBAGE\r\n\r\n", b"400 Bad Request", "Bad Request: Start line is invalid"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nContent-Length: 12x\r\n\r\n", b"400 Bad Request",
         "Bad Request: Content-Length is invalid"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"400 Bad Request",
         "Bad Request: Invalid chunk size"),
        (b"POST /api/v1/devices/x/heartbeat HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501 Not Implemented",
         "Not Implemented: Transfer-Encoding requested is not supported."),
        # Exactly the 256 KiB limit and no end, so the server reads it all before answering.
        (b"GET / HTTP/1.1\r\nX-Big: ".ljust(256 * 1024, b"x"), b"431 Request Header Fields Too Large",
         "Request Header Fields Too Large: exceeds max_header of 262144"),
        # Refused from its Content-Length, before one byte of the body is sent.
        (f"POST {heartbeat_url()} HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 20000000\r\n\r\n".encode(),
         b"413 Request Entity Too Large", "Request Entity Too Large: exceeds max_body of 65537"),
    ],
)
def test_http_the_server_layer_refuses_is_answered_in_json(app, request_bytes, status, msg):
    with waitress_server(app) as port:
        head, body = raw_exchange(port, request_bytes).split(b"\r\n\r\n", 1)
    assert status in head.split(b"\r\n")[0]
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"msg": msg}


def test_a_server_that_cannot_be_made_closes_its_listening_socket():
    listener = fleetmon.listen("127.0.0.1", 0)
    with pytest.raises(ValueError):
        connections.create_server(Flask(__name__), listener, threads="many")
    assert listener.fileno() == -1


def test_a_server_that_cannot_be_made_stops_the_workers_it_started(monkeypatch):
    def failing(*args, **kwargs):
        raise OSError("out of file descriptors")

    monkeypatch.setattr(connections.FleetmonServer, "__init__", failing)
    listener = fleetmon.listen("127.0.0.1", 0)
    with pytest.raises(OSError):
        connections.create_server(Flask(__name__), listener)
    assert listener.fileno() == -1
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("waitress")] == []


# --- Connection slots ---------------------------------------------------------------------

BIG_RESPONSE_BYTES = 12 * 1024 * 1024  # more than socket buffers hold, less than waitress's high watermark
HELLO = b"GET /hello HTTP/1.1\r\nHost: fleetmon\r\n\r\n"
HELLO_AND_CLOSE = b"GET /hello HTTP/1.1\r\nHost: fleetmon\r\nConnection: close\r\n\r\n"


@pytest.fixture
def small_app():
    """A Flask app with answers of every speed and size, for the connection-slot tests."""
    app = Flask(__name__)
    release = threading.Event()
    app.add_url_rule("/hello", "hello", lambda: "hello")
    app.add_url_rule("/echo", "echo", lambda: request.get_data(), methods=["POST"])
    app.add_url_rule("/big", "big", lambda: b"x" * BIG_RESPONSE_BYTES)

    @app.get("/slow")
    def slow():
        release.wait(timeout=30)
        return "slow"

    app.config["RELEASE"] = release
    yield app
    release.set()  # so that the worker thread can stop


@contextmanager
def serving(app, **settings):
    """fleetmon's server for app, its connections checked only when a test says; yields
    (server, connect(rcvbuf=None), a new client socket, closed after)."""
    with running(fleetmon_server(app, cleanup_interval=3600, **settings)) as server, ExitStack() as sockets:

        def connect(rcvbuf=None):
            client = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            if rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client.settimeout(10)
            client.connect(("127.0.0.1", int(server.effective_port)))
            return client

        yield server, connect


def on_loop(server, function):
    """function() run in the server's loop thread, between two select() calls, where
    the server reads and changes its channels."""
    results = queue.Queue()

    def call():
        try:
            results.put((True, function()))
        except Exception as error:  # noqa: BLE001 - raised again in the test's thread
            results.put((False, error))

    server.trigger.pull_trigger(call)
    ok, result = results.get(timeout=10)
    if not ok:
        raise result
    return result


def wait_until(server, condition, what):
    """Wait for the server to reach a state (in its loop thread), failing after 10 s."""
    deadline = time.monotonic() + 10
    while not on_loop(server, condition):
        assert time.monotonic() < deadline, f"the server did not reach: {what}"
        time.sleep(0.01)


def channel_of(server, client):
    """The server's channel for a client socket, or None if the server has none."""
    port = client.getsockname()[1]
    return next((c for c in server.active_channels.values() if c.addr[1] == port), None)


def fill_the_slots(server, connect):
    """A client for every free connection slot, each accepted."""
    clients = [connect() for _ in range(server.adj.connection_limit - on_loop(server, lambda: len(server._map)))]
    wait_until(server, lambda: len(server._map) == server.adj.connection_limit
               and all(channel_of(server, c) for c in clients), "every client accepted")
    return clients


def hello(client):
    """GET /hello on a connection kept open, its answer read to its end."""
    client.sendall(HELLO)
    answer = b""
    while not answer.endswith(b"hello") and (chunk := client.recv(65536)):
        answer += chunk
    return answer


def idle_since(channel, monotonic_time):
    """Make a channel look idle since then. (Its last_activity takes the monotonic time
    whatever it is set to, as waitress sets it from the wall clock.)"""
    channel._last_activity = monotonic_time


REQUEST_SECONDS = connections.REQUEST_SECONDS


@pytest.mark.parametrize("sent", [
    b"GET /hello HTTP/1.1\r\nHost: fle",  # a head trickled
    b"POST /echo HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 10\r\n\r\nabc",  # a body trickled
], ids=["head", "body"])
def test_a_request_not_in_within_the_limit_is_answered_408_and_closed(small_app, sent):
    with serving(small_app) as (server, connect):
        client = connect()
        client.sendall(sent)
        wait_until(server, lambda: channel_of(server, client) and channel_of(server, client).request_began,
                   "the request began")
        began = on_loop(server, lambda: channel_of(server, client).request_began)

        # Just within the limit: at it exactly, the float sum may round to beyond it.
        on_loop(server, lambda: server.maintenance(began + REQUEST_SECONDS - 0.01))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "closing while in time"

        on_loop(server, lambda: server.maintenance(began + REQUEST_SECONDS + 1))
        head, _, body = read_to_end(client).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert json.loads(body) == {"msg": f"Request Timeout: the request did not arrive within {REQUEST_SECONDS} s"}
        wait_until(server, lambda: channel_of(server, client) is None, "the channel closed")


def test_an_idle_keep_alive_connection_is_left_to_channel_timeout(small_app):
    with serving(small_app) as (server, connect):
        client = connect()
        assert hello(client).endswith(b"hello")
        client.sendall(b"\r\n")  # as some clients do after a request; it begins none (RFC 9112, 2.2)
        wait_until(server, lambda: channel_of(server, client).request is not None, "the blank line read")
        assert on_loop(server, lambda: channel_of(server, client).between_requests())
        idle_since = on_loop(server, lambda: channel_of(server, client).last_activity)

        on_loop(server, lambda: server.maintenance(idle_since + REQUEST_SECONDS + 1))
        on_loop(server, lambda: server.maintenance(idle_since + server.adj.channel_timeout - 1))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "closed before channel_timeout"

        on_loop(server, lambda: server.maintenance(idle_since + server.adj.channel_timeout + 1))
        assert read_to_end(client) == b"", "waitress closes an idle connection without a word"


def test_a_connection_is_timed_by_the_monotonic_clock_whatever_the_wall_clock_says(small_app):
    """waitress stamps a channel's activity with the wall clock, which a clock step moves:
    stepped back two hours, an idle connection stayed open for those two hours."""
    with serving(small_app) as (server, connect):
        client = connect()
        assert hello(client).endswith(b"hello")

        def stamp_with_a_wall_clock_stepped_back():
            before = time.monotonic()
            channel_of(server, client).last_activity = time.time() - 7200
            return before, channel_of(server, client).last_activity, time.monotonic()
        before, stamped, after = on_loop(server, stamp_with_a_wall_clock_stepped_back)
        assert before <= stamped <= after


def test_a_pipelined_request_gets_its_time_from_when_the_server_reads_it(small_app):
    with serving(small_app, channel_timeout=3600) as (server, connect):
        client = connect()
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: fleetmon\r\n\r\nGET /hello HTTP/1.1\r\nHo")
        wait_until(server, lambda: channel_of(server, client) and channel_of(server, client).requests,
                   "the first request queued")
        began = on_loop(server, lambda: channel_of(server, client).request_began)
        assert began is not None

        # Long after it began, but the server has been busy with the one before.
        on_loop(server, lambda: server.maintenance(began + REQUEST_SECONDS + 5))
        small_app.config["RELEASE"].set()
        wait_until(server, lambda: not channel_of(server, client).requests, "the first request answered")
        # Just within the limit, as in the test above.
        on_loop(server, lambda: server.maintenance(began + REQUEST_SECONDS + 5 + REQUEST_SECONDS - 0.01))
        assert on_loop(server, lambda: channel_of(server, client).readable()), "timed from when it began"
        client.sendall(b"st: fleetmon\r\nConnection: close\r\n\r\n")
        answers = read_to_end(client)
        assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.endswith(b"hello")


def test_at_the_limit_the_longest_idle_connection_makes_room_unless_a_request_has_come_on_it(small_app):
    with serving(small_app, connection_limit=5) as (server, connect):
        first, used, last = clients = fill_the_slots(server, connect)
        assert hello(used).endswith(b"hello")
        wait_until(server, lambda: channel_of(server, used).between_requests(), "the request answered")

        def hold_newcomers():
            server.accepting = False  # until this test makes the server accept
            for client, since in zip(clients, [0, 2, 1]):  # not in the order they were accepted, or used
                idle_since(channel_of(server, client), since)
        on_loop(server, hold_newcomers)
        newcomer = connect()  # into the listen queue
        newcomer.sendall(HELLO_AND_CLOSE)

        def request_comes_then_accept():
            # In the loop thread, so that the server cannot read the request first.
            first.sendall(HELLO_AND_CLOSE)
            assert select.select([channel_of(server, first).socket], [], [], 10)[0], "the request did not come"
            server.accepting = True
            server.handle_accept()
        on_loop(server, request_comes_then_accept)

        assert read_to_end(last) == b"", "the longest idle without a request come"
        assert read_to_end(first).endswith(b"hello")
        assert read_to_end(newcomer).endswith(b"hello")
        assert on_loop(server, lambda: channel_of(server, used)) is not None, "another one closed"


def test_no_connection_in_the_middle_of_a_request_is_shed(small_app):
    # In memory: a temporary file would be left open, as wasyncore.close_all() closes a
    # channel's socket but not its buffers.
    with serving(small_app, connection_limit=6, outbuf_overflow=2 * BIG_RESPONSE_BYTES) as (server, connect):
        assert on_loop(server, lambda: server.adj.connection_limit - len(server._map)) == 4

        writing = connect(rcvbuf=4096)  # reads none of its response
        writing.sendall(b"GET /big HTTP/1.1\r\nHost: fleetmon\r\n\r\n")
        wait_until(server, lambda: channel_of(server, writing) and not channel_of(server, writing).requests
                   and channel_of(server, writing).total_outbufs_len, "the response being written")
        running_task = connect()
        running_task.sendall(b"GET /slow HTTP/1.1\r\nHost: fleetmon\r\n\r\n")
        reading_head = connect()
        reading_head.sendall(b"GET /hello HTTP/1.1\r\nHo")
        reading_body = connect()
        reading_body.sendall(b"POST /echo HTTP/1.1\r\nHost: fleetmon\r\nContent-Length: 10\r\n\r\nabc")
        busy = [writing, running_task, reading_head, reading_body]
        wait_until(server, lambda: all(channel_of(server, c) and channel_of(server, c).request_began for c in busy[2:])
                   and channel_of(server, running_task).requests, "every connection busy")

        def make_them_look_idle_longest():
            for client in busy:
                idle_since(channel_of(server, client), 0)
        on_loop(server, make_them_look_idle_longest)

        newcomer = connect()  # into the listen queue
        newcomer.sendall(HELLO_AND_CLOSE)
        assert on_loop(server, server.readable) is False, "accepting with no connection to shed"
        assert on_loop(server, lambda: all(channel_of(server, c) for c in busy)), "a busy one shed"
        assert on_loop(server, lambda: channel_of(server, newcomer)) is None, "the newcomer accepted"

        # The task ends, its connection goes idle, and makes room.
        small_app.config["RELEASE"].set()
        assert read_to_end(newcomer).endswith(b"hello")
        assert read_to_end(running_task).endswith(b"slow")  # its answer whole, then closed
        assert on_loop(server, lambda: [channel_of(server, c) is not None for c in busy]) == [True, False, True, True]


# --- The start: options, and what stops it ------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1.5h", 5400), ("90", 90), ("0.5", 0.5)])
def test_down_after_takes_seconds_or_a_unit(text, seconds):
    assert status.seconds_argument(text) == seconds


NOT_A_TIME = "is not a time: give seconds, or a number with s, m or h, like 5m"
NO_TIME = "is not more than no time at all: give a time like 5m"
NO_URL = "must be an http:// or https:// URL with a host, like https://example.com/hook"


# A command line fleetmon cannot use is refused by argparse, in one line, with exit status 2.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        *((["--port", port], f"argument --port: {port!r} is not a port from 0 to 65535")
          for port in ("-1", "65536", "99999", "x", "６")),
        *((["--keep-days", days], f"argument --keep-days: {days!r} is not a whole number of days, 1 or more")
          for days in ("0", "1.5", "-2", "many")),
        *((["--alert-url", url], f"argument --alert-url: {NO_URL}")
          for url in ("hooks.example/x", "ftp://hooks.example/x", "http://", "https:///x")),
        *(([f"--down-after={text}"], f"argument --down-after: {text!r} {NOT_A_TIME}")
          for text in ("", "m", "5x", "nan", "inf", "1e999h")),
        *(([f"--down-after={text}"], f"argument --down-after: {text!r} {NO_TIME}") for text in ("-5s", "0", "0m")),
        (["--down-after", "-5s"],
         "argument --down-after: expected a value (one beginning with - goes as --option=VALUE)"),
        (["--nonsense"], "unrecognized arguments: --nonsense"),
    ],
)
def test_an_unusable_option_is_refused_in_one_line(tmp_path, capsys, args, message):
    assert start_with(capsys, *args, "--db", tmp_path / "x.db") == (2, f"fleetmon: {message} (see --help)\n")
    assert list(tmp_path.iterdir()) == []  # nothing was opened


def test_an_alert_url_that_cannot_be_parsed_is_refused_in_one_line(tmp_path, capsys):
    assert start_with(capsys, "--alert-url", "http://[::1/hook", "--db", tmp_path / "x.db") == (
        2, f"fleetmon: argument --alert-url: {NO_URL} (see --help)\n")


# What the command line names but fleetmon cannot use stops the start in one line, status 1.
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "{missing}"], "cannot use database {missing}: there is no folder {missing.parent}"),
        (["--db", "{tmp}"], "cannot use database {tmp}: unable to open database file"),
        (["--db", "{notes}"], "cannot use database {notes}: file is not a database"),
        (["--devices", "{missing}"], "cannot read devices file {missing}: No such file or directory"),
        (["--password-file", "{missing}"], "cannot read password file {missing}: No such file or directory"),
    ],
)
def test_what_fleetmon_cannot_use_stops_the_start_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.delenv("FLEETMON_PASSWORD", raising=False)
    paths = {"tmp": tmp_path, "missing": tmp_path / "missing" / "fleetmon.db", "notes": tmp_path / "notes.txt"}
    paths["notes"].write_bytes(b"not a database, just text " * 100)
    args = [arg.format(**paths) for arg in args]
    database = [] if "--db" in args else ["--db", tmp_path / "fleetmon.db"]
    assert start_with(capsys, "--port", 0, *database, *args) == (1, f"fleetmon: {message.format(**paths)}\n")


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, printed = start_with(capsys, "--port", port, "--db", tmp_path / "fleetmon.db")
    assert (status, printed) == (
        1, f"fleetmon: cannot listen on 127.0.0.1:{port}: the port is in use (another fleetmon? --port chooses another)\n"
    )
    assert list(tmp_path.iterdir()) == []  # the port is taken first: no database made


@contextmanager
def watch_failing_as_it_starts(monkeypatch):
    """The database failing as the housekeeping's watch reads it; yields every connection
    opened meanwhile."""
    opened, real_connect = [], fleetmon.connect

    def connect(database):
        opened.append(real_connect(database))
        return opened[-1]

    def watch_failing(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    for module in (fleetmon, housekeeping):
        monkeypatch.setattr(module, "connect", connect)
    monkeypatch.setattr(housekeeping, "Watch", watch_failing)
    yield opened


def test_a_database_failing_as_the_watch_starts_stops_the_start_with_one_line(tmp_path, capsys, monkeypatch):
    database = tmp_path / "fleetmon.db"
    with watch_failing_as_it_starts(monkeypatch) as opened:
        status = fleetmon.main(["--port", "0", "--db", str(database)])
    printed = capsys.readouterr()
    assert (status, printed.err) == (1, f"fleetmon: cannot use database {database}: disk I/O error\n")
    assert "listening on" not in printed.out
    assert len(opened) >= 3  # the start's, the housekeeping's two
    for db in opened:  # every connection it opened, closed
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")
    with open_app(database):  # and the database let go
        pass
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("waitress")] == []  # its workers


def test_a_start_that_fails_says_nothing_but_why(tmp_path, capsys, monkeypatch):
    with watch_failing_as_it_starts(monkeypatch):
        assert fleetmon.main(["--port", "0", "--db", str(tmp_path / "fleetmon.db")]) == 1
    assert capsys.readouterr().out == ""


def test_a_bad_devices_file_stops_the_process_with_one_line_on_stderr(tmp_path):
    missing = tmp_path / "nowhere.csv"
    run = subprocess.run(fleetmon_command("--port", 0, "--devices", missing, "--db", tmp_path / "x.db"),
                         capture_output=True, text=True, timeout=60, check=False)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"fleetmon: cannot read devices file {missing}: No such file or directory\n"


# --- The server window --------------------------------------------------------------------


def test_activity_is_one_line_per_interval_and_nothing_while_idle(app, client):
    told = activity.Activity(app.extensions["fleetmon.answers"], monotonic_now=100)
    assert told.take_line(110) is None
    send(client, *(heartbeat(minute_of_day(minute)) for minute in range(3)), upload(5))
    client.get(stats_url())
    client.get("/")  # not telemetry: not counted
    client.post(heartbeat_url(), data=b"{")
    client.post(heartbeat_url(), data=b"[]")
    client.get(stats_url("unknown"))
    assert told.take_line(120) == (
        "fleetmon: last 10 s: 3 heartbeats, 1 upload, 1 stats read, 3 rejected (400 x2, 404 x1)"
    )
    assert told.take_line(123.5) is None
    app.config["PROPAGATE_EXCEPTIONS"] = False  # a 500 is told apart, as failed
    query(app, "DROP TABLE uploads")
    client.post(stats_url(), json={"sent_at": SENT_AT, "upload_time": 5})
    assert told.take_line(124) == "fleetmon: last 0 s: 0 heartbeats, 0 uploads, 0 stats reads, 0 rejected, 1 failed (500 x1)"


def test_the_activity_line_comes_every_interval_while_serving_and_nothing_after(app, client, monkeypatch):
    monkeypatch.setattr(activity, "ACTIVITY_SECONDS", 0.01)
    told = queue.Queue()
    with activity.reporting(app, told.put):
        send(client, heartbeat(SENT_AT))
        line = told.get(timeout=30)
    assert re.fullmatch(r"fleetmon: last \d+ s: 1 heartbeat, 0 uploads, 0 stats reads, 0 rejected", line)
    assert told.empty()  # the stop's last line: none, with nothing answered since


@pytest.mark.parametrize(("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("localhost", "localhost")])
def test_an_ipv6_address_is_bracketed_in_a_url(host, shown):
    assert fleetmon.url_host(host) == shown


@pytest.mark.parametrize(
    ("settings", "down_line"),
    [
        ({}, "fleetmon: a device is down after 1 min unheard"),
        ({"keep_days": 1, "alert_url": "https://bot:secret@hooks.example/services/T0/B0/XYZ"},
         "fleetmon: a device is down after 1 min unheard; alerts to https://hooks.example/…; history kept 1 day"),
        ({"keep_days": 30}, "fleetmon: a device is down after 1 min unheard; history kept 30 days"),
    ],
    ids=["plain", "alerts and retention", "retention"],
)
def test_the_server_window_from_the_start_to_ctrl_c(tmp_path, monkeypatch, settings, down_line):
    real_create_server, made = connections.create_server, []

    def server_stopped_by_ctrl_c(app, listener, **settings):
        made.append(real_create_server(app, listener, **settings))

        def run():  # waitress's run() returns when Ctrl+C stops it; before that, one request
            app.test_client().post(heartbeat_url(), json={"sent_at": SENT_AT})

        made[-1].run = run
        return made[-1]

    monkeypatch.setattr(connections, "create_server", server_stopped_by_ctrl_c)
    devices, database, lines = devices_file(tmp_path, DEVICE), tmp_path / "fleetmon.db", []
    listener = fleetmon.listen("127.0.0.1", 0)
    with open_app(database, devices, down_after_seconds=60, **settings) as app:
        fleetmon.serve(app, listener, announce=lines.append)
    assert lines[:3] == [f"fleetmon: 1 device from {devices}, database {database}",
                         "fleetmon: the operator's views are open to this machine alone (loopback)", down_line]
    assert re.fullmatch(r"fleetmon: listening on http://127\.0\.0\.1:\d+/api/v1 \(fleet page http://127\.0\.0\.1:\d+/, "
                        r"docs http://127\.0\.0\.1:\d+/docs/\)", lines[3])
    assert re.fullmatch(r"fleetmon: last \d+ s: 1 heartbeat, 0 uploads, 0 stats reads, 0 rejected", lines[4])
    assert lines[5:] == ["fleetmon: stopped"]
    assert listener.fileno() == -1  # closed with the server
    adjusted = made[0].adj  # the server runs with fleetmon's settings
    assert {name: getattr(adjusted, name) for name in connections.SETTINGS} == connections.SETTINGS


class ServerStoppedAtOnce:
    """In place of waitress's server: stopped by Ctrl+C before any request."""

    def __init__(self, listener):
        self.listener = listener

    def run(self):
        pass

    def close(self):
        self.listener.close()


def test_an_upgrade_is_told_first(tmp_path, monkeypatch):
    monkeypatch.setattr(connections, "create_server", lambda app, listener, **settings: ServerStoppedAtOnce(listener))
    lines = []
    with open_app(tmp_path / "fleetmon.db") as app:
        app.config["UPGRADED"] = "upgraded database x from schema version 2 to 3: 5 rows written in 0.0 s"
        fleetmon.serve(app, fleetmon.listen("127.0.0.1", 0), announce=lines.append)
    assert lines[0] == f"fleetmon: {app.config['UPGRADED']}"


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no SIGTERM to send: terminate() kills")
def test_sigterm_stops_fleetmon_as_ctrl_c_does(tmp_path):
    """What a service manager sends to stop a service: the window says it stopped, and the
    exit status is 0."""
    database = tmp_path / "fleetmon.db"
    with server_process("--port", 0, "--db", database, "--down-after", "90s") as (process, port, printed, wait_for):
        assert get(port, stats_url()) == (204, b"")  # answered: serving, so its SIGTERM handler is in place
        process.terminate()
        wait_for("fleetmon: stopped")
        assert process.wait(timeout=60) == 0
    url = f"http://127.0.0.1:{port}"
    assert printed[:4] == [
        f"fleetmon: 5 devices from {DEVICES_CSV}, database {database}\n",
        "fleetmon: the operator's views are open to this machine alone (loopback)\n",
        "fleetmon: a device is down after 1 min 30 s unheard\n",
        f"fleetmon: listening on {url}/api/v1 (fleet page {url}/, docs {url}/docs/)\n",
    ]
    assert re.fullmatch(r"fleetmon: last \d+ s: 0 heartbeats, 0 uploads, 1 stats read, 0 rejected\n", printed[4])
    assert printed[5:] == ["fleetmon: stopped\n"]


def test_a_device_id_the_output_cannot_encode_prints_escaped_never_as_a_traceback(tmp_path):
    """Output to a pipe or a file is cp1252 on Windows, whatever the console shows: a device
    id outside it is written escaped, and its down and up lines come as for any other."""
    camera = "カメラ-1"
    devices = devices_file(tmp_path, camera)
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}  # what Windows gives a pipe
    path = "/api/v1/devices/" + urllib.parse.quote(camera) + "/heartbeat"
    with server_process("--port", 0, "--db", tmp_path / "fleetmon.db", "--devices", devices, "--down-after", "0.2s",
                        env=env) as (_, port, printed, wait_for), \
            closing(HTTPConnection("127.0.0.1", port, timeout=30)) as connection:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        assert http_request(connection, "POST", path, {"sent_at": now})[0] == 204
        down = wait_for(" is down ")
        assert http_request(connection, "POST", path, {"sent_at": now})[0] == 204
        up = wait_for(" is up again ")
    escaped = r"\u30ab\u30e1\u30e9-1"
    assert down.startswith(f"fleetmon: {escaped} is down (last heard ") and up.startswith(f"fleetmon: {escaped} is up")
    assert not any("Traceback" in line for line in printed if line)


def test_the_simulators_table_prints_a_device_id_the_output_cannot_encode(tmp_path):
    camera = "カメラ-1"
    devices = devices_file(tmp_path, camera)
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    with server_process("--port", 0, "--db", tmp_path / "fleetmon.db", "--devices", devices) as (_, port, _, _):
        run = subprocess.run([sys.executable, str(HERE / "simulator.py"), "--url", f"http://127.0.0.1:{port}",
                              "--devices", str(devices)], capture_output=True, env=env, timeout=120, check=False)
    assert run.returncode in (0, 1), run.stderr  # 1: no published result to check for this device
    assert rb"\u30ab\u30e1\u30e9-1 " in run.stdout and b"Traceback" not in run.stderr
