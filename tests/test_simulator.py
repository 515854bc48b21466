"""simulator.py, the vendor's day and a live fleet: what it sends, the table it prints, and
every way a server (fleetmon or not) can fail it, each told in one line."""

import itertools
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

import simulator
from conftest import (
    DEVICE,
    DEVICES_CSV,
    HERE,
    OTHER_DEVICE,
    STOP,
    FakeServer,
    devices_file,
    heartbeat,
    http_answer,
    minute_of_day,
    open_app,
    send,
    stored,
    stored_minutes,
    stored_uploads,
    unused_port,
    waitress_server,
)
from fleetmon import uptime_percent, utc_minute
from simulator import PUBLISHED_DAYS, simulated_day


def simulate(*args):
    """simulator.main for args, each as text: its exit status."""
    return simulator.main([str(arg) for arg in args])


# --- The vendor's day, sent to fleetmon ---------------------------------------------------


def test_the_simulator_sends_the_day_of_any_devices_file_and_prints_the_published_table(tmp_path, capsys):
    devices = devices_file(tmp_path, *PUBLISHED_DAYS, "cam-1", "cam-2")
    with open_app(tmp_path / "fleet.db", devices) as app, waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[1:-2]] == [
        *([device_id, day.uptime, day.avg_upload_time, "PASS"] for device_id, day in sorted(PUBLISHED_DAYS.items())),
        ["cam-1", "-", "-"],  # the first device not the vendor's sends nothing
    ]
    assert lines[-2].split()[0] == "cam-2" and float(lines[-2].split()[1]) > 0
    sent = sum(len(simulated_day(device_id)) for device_id in [*PUBLISHED_DAYS, "cam-2"])
    assert lines[-1] == f"simulator: {sent:,} requests sent, 0 failed; 5 of 5 published results match"


def test_simulated_days_are_repeatable_per_seed_and_make_a_varied_fleet():
    def uptime(day):
        minutes = {utc_minute(event.body["sent_at"]) for event in day if event.path.endswith("/heartbeat")}
        return uptime_percent(len(minutes), min(minutes), max(minutes))

    fleet = [simulated_day(f"cam-{number:03d}", seed=7) for number in range(100)]
    assert fleet[:10] == [simulated_day(f"cam-{number:03d}", seed=7) for number in range(10)]
    assert fleet[:10] != [simulated_day(f"cam-{number:03d}", seed=8) for number in range(10)]
    uptimes = sorted(uptime(day) for day in fleet)
    assert uptimes[0] < 90  # some flaky
    assert uptimes[50] > 99  # most steady
    assert all(len([event for event in day if event.path.endswith("/stats")]) == 100 for day in fleet)


def test_the_simulator_runs_as_a_script_on_the_standard_library_alone():
    # -S: no site-packages, so that importing fleetmon (and so Flask) or any other package fails.
    result = subprocess.run([sys.executable, "-S", str(HERE / "simulator.py"), "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: simulator.py [-h] [--url URL] [--devices CSV] [--seed SEED]")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        *((["--pace", pace], f"argument --pace: must be a number of seconds, 0 or more, not '{pace}'")
          for pace in ("-5", "nan", "inf")),
        (["--live", "--every", "0"], "argument --every: must be a number of seconds, 0.01 or more, not '0'"),
        *((["--url", url], f"argument --url: must be an http:// URL with a valid port, not '{url}'")
          for url in ("http://127.0.0.1:99999", "ftp://127.0.0.1", "127.0.0.1:6733")),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--devices", "no-such.csv"], "cannot read devices file no-such.csv: No such file or directory"),
    ],
)
def test_the_simulator_refuses_what_it_cannot_use_in_one_line(capsys, args, message):
    assert simulate(*args) == 2
    assert capsys.readouterr() == ("", f"simulator: {message}\n")


def test_the_simulator_without_fleetmon_is_one_line_and_exit_2(capsys):
    url = f"http://127.0.0.1:{unused_port()}"
    assert simulate("--url", url) == 2
    assert capsys.readouterr() == ("", f"simulator: nothing answers at {url} (connection refused); is fleetmon running?\n")


@pytest.mark.parametrize(("known", "unknown"), [(["cam-1", "cam-2"], 5), (sorted(PUBLISHED_DAYS)[:3], 2)])
def test_a_fleetmon_started_with_another_devices_file_is_told_and_sent_nothing(tmp_path, capsys, known, unknown):
    with open_app(tmp_path / "fleetmon.db", devices_file(tmp_path, *known)) as app, waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}") == 2
        assert stored(app, ("online_hours", "uploads")) == {"online_hours": [], "uploads": []}
    told = (f"simulator: fleetmon at http://127.0.0.1:{port} does not know {unknown} of the 5 devices in "
            f"{DEVICES_CSV} (started with another devices file?)\n")
    assert capsys.readouterr() == ("", told)


@pytest.mark.parametrize("again", [False, True])
def test_a_fleetmon_that_holds_telemetry_already_is_told_before_anything_is_sent(app, client, tmp_path, capsys, again):
    """Sent again, a device's uploads count twice: the simulator refuses, unless --again,
    and then checks no published result of a device that had telemetry before."""
    send(client, heartbeat(minute_of_day(4)))
    devices = devices_file(tmp_path, DEVICE, OTHER_DEVICE)
    with waitress_server(app) as port:
        before = stored(app)
        status = simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices, *(["--again"] if again else []))
        after = stored(app)
    printed = capsys.readouterr()
    held = f"simulator: fleetmon at http://127.0.0.1:{port} already holds telemetry for 1 of the 2 devices in {devices}"
    if not again:
        assert (status, printed.out, after) == (2, "", before)
        assert printed.err == (f"{held}: sent again, their uploads would count twice; "
                               "start fleetmon with a fresh --db, or give --again to send anyway\n")
    else:
        assert status == 0
        # Less its progress, a line every 10 s, which a slow machine (Wine's, say) gets too.
        told = [line for line in printed.err.splitlines() if not re.search(r" of [\d,]+ requests sent, ", line)]
        assert told == [f"{held}; sending again (--again), so their published results cannot be checked"]
        lines = printed.out.splitlines()
        sent = len(simulated_day(DEVICE)) + len(simulated_day(OTHER_DEVICE))
        assert lines[-1] == (f"simulator: {sent:,} requests sent, 0 failed; 1 of 1 published results match; "
                             "1 not checked: fleetmon held their telemetry before")
        assert [line.split()[-2:] for line in lines if line.startswith(DEVICE)] == [["not", "checked"]]


def test_a_fleetmon_whose_operator_views_need_a_password_still_takes_the_day(tmp_path, capsys):
    """Its root answers the simulator 401; the devices' endpoints need no password."""
    devices = devices_file(tmp_path, DEVICE)
    with open_app(tmp_path / "fleet.db", devices, OPERATOR_PASSWORD="secret", ALLOWED_HOSTS=["127.0.0.1"]) as app, \
            waitress_server(app) as port:
        assert simulate("--url", f"http://127.0.0.1:{port}", "--devices", devices) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("1 of 1 published results match")


# --- Servers that fail it -----------------------------------------------------------------


def fleetmon_answer(method, path):
    """What fleetmon answers a simulator on a fresh database."""
    return http_answer(200, b'{"name": "fleetmon"}') if path == "/" else http_answer(204)


FIRST_STATS = f"/api/v1/devices/{min(PUBLISHED_DAYS)}/stats"  # the first the simulator reads
NOT_STATS = f"answered GET {FIRST_STATS} with a body that is not a device's stats"


@pytest.mark.parametrize(
    ("garbled", "answer", "problem"),
    [
        ("/", lambda: b"SSH-2.0-OpenSSH_9.6\r\n", "answered GET / with something that is not HTTP"),
        ("/", lambda: itertools.chain([b"HTTP/1.1 200 OK\r\n\r\n"], itertools.repeat(b"{" * 4096)),
         "answered GET / with a body of more than 64 KiB"),
        ("/", lambda: b"", "closed the connection twice without answering GET /"),
        ("/", lambda: http_answer(200, b'{"name": "something else"}'), "answers, but not as fleetmon (HTTP 200)"),
        (FIRST_STATS, lambda: http_answer(500, b"{}"), f"answered GET {FIRST_STATS} with HTTP 500"),
        (FIRST_STATS, lambda: http_answer(200, b"<p>stats</p>"), NOT_STATS),
        (FIRST_STATS, lambda: http_answer(200, b"[" * 60_000), NOT_STATS),
        (FIRST_STATS, lambda: http_answer(200, b'{"uptime": "high", "avg_upload_time": "3s"}'), NOT_STATS),
    ],
)
def test_a_server_answering_garbage_is_told_in_one_line(capsys, garbled, answer, problem):
    with FakeServer(lambda method, path: answer() if path == garbled else fleetmon_answer(method, path)) as server:
        assert simulate("--url", server.url) == 2
    assert capsys.readouterr() == ("", f"simulator: {server.url} {problem}\n")


def test_a_server_that_never_answers_is_given_up_on_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(simulator, "ANSWER_TIMEOUT_SECONDS", 0.2)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # connections are made, and never read
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert simulate("--url", url) == 2
    assert capsys.readouterr() == ("", f"simulator: {url} did not answer GET / within 0.2 s\n")


def test_when_fleetmon_stops_every_client_stops_at_the_refused_connection(capsys):
    """fleetmon stopping stops listening and drops its connections: the next request is
    refused, and the simulator stops there, rather than count the rest of its day failed."""
    posts = itertools.count(1)

    def answer(method, path):
        return STOP if method == "POST" and next(posts) > 100 else fleetmon_answer(method, path)

    with FakeServer(answer) as server:
        assert simulate("--url", server.url) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert re.fullmatch(rf"simulator: fleetmon at {server.url} stopped answering \(connection refused\) "
                        r"after 10[0-5] of 2,910 requests\n", printed.err)
    # The hundred answered, and at most one more from each of the five clients.
    assert len([method for method, _ in server.requests if method == "POST"]) <= 100 + 5


@pytest.mark.parametrize(
    ("terminal", "printed"),
    [
        (True, ("\rsimulator: 10 of 100 requests sent, 0 failed, 20 requests/s"
                "\rsimulator: 60 of 100 requests sent, 1 failed, 6 requests/s"
                "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s"
                "\rsimulator: 100 of 100 requests sent, 1 failed, 8 requests/s\n")),
        (False, "simulator: 60 of 100 requests sent, 1 failed, 6 requests/s\n"),
    ],
)
def test_progress_is_rewritten_in_place_on_a_terminal_and_a_line_now_and_then_elsewhere(capsys, terminal, printed):
    simulation = simulator.Simulation("http://127.0.0.1:6733", ["cam-1"], seed=0, pace=0)
    simulation.terminal, simulation.started, simulation.shown, simulation.total = terminal, 0.0, 0.0, 100
    for now, sent, failed in [(0.5, 10, 0), (10, 60, 1), (12.5, 100, 1)]:
        simulation.sent, simulation.failed = sent, failed
        simulation.show_progress(now)
    simulation.show_progress(12.5, final=True)
    assert capsys.readouterr() == ("", printed)


# --- A live fleet -------------------------------------------------------------------------


def test_live_sends_a_heartbeat_every_interval_but_none_while_a_device_is_dropped_out():
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    run = simulator.LiveRun(["cam-1", "cam-2"], every=10, seed=0, start=start,
                            dropouts=[simulator.Dropout("cam-2", 20, 95)])
    lines, sent = [], []
    for second in range(0, 125, 5):
        assert run.next_step() == start + timedelta(seconds=second)
        printed, telemetry = run.step(start + timedelta(seconds=second))
        lines += [(second, line) for line in printed]
        sent += [(event.path.split("/")[4:], event.body["sent_at"]) for event in telemetry]
    assert lines == [(20, "simulator: cam-2 drops out for 75 s"), (95, "simulator: cam-2 is back after 75 s")]

    def seconds(device_id, endpoint):
        return [round((datetime.fromisoformat(sent_at) - start).total_seconds())
                for path, sent_at in sent if path == [device_id, endpoint]]

    assert seconds("cam-1", "heartbeat") == list(range(0, 125, 10))
    assert seconds("cam-2", "heartbeat") == [5, 15, 95, 105, 115]
    assert seconds("cam-1", "stats") == [0, 60, 120]  # an upload with every sixth heartbeat
    assert seconds("cam-2", "stats") == [5]
    assert sent[0] == (["cam-1", "heartbeat"], "2025-03-01T12:00:00.000000Z")


def test_live_dropouts_come_one_at_a_time_the_first_soon_after_the_start():
    """So that a fleetmon with a short --down-after shows a device go down and come back
    within a few minutes of the start, and another every few minutes; each long enough to
    hold two whole minutes with no heartbeat (three minutes do, wherever they fall), so
    that its uptime and its strip show the outage."""
    dropouts = list(itertools.islice(simulator.live_dropouts(sorted(PUBLISHED_DAYS), seed=0), 100))
    shortest, longest = simulator.DROPOUT_SECONDS
    assert dropouts[0].start == simulator.FIRST_DROPOUT_SECONDS == 20
    assert 3 * 60 <= shortest <= longest <= 5 * 60
    assert all(shortest <= dropout.end - dropout.start <= longest for dropout in dropouts)
    least, most = simulator.BETWEEN_DROPOUTS_SECONDS
    assert all(least <= later.start - earlier.end <= most for earlier, later in itertools.pairwise(dropouts))
    assert {dropout.device_id for dropout in dropouts} == set(PUBLISHED_DAYS)


def napping_until(stop, monkeypatch):
    """simulator.sleep, sleeping as asked until stop() is true, then Ctrl+C."""
    naps = []

    def nap(seconds):
        naps.append(seconds)
        assert len(naps) < 10_000, "the simulator never got as far as the test waits for"
        if stop():
            raise KeyboardInterrupt
        time.sleep(seconds)

    monkeypatch.setattr(simulator, "sleep", nap)


def test_live_sends_telemetry_stamped_now_until_ctrl_c(app, capsys, monkeypatch):
    first_minute = int(time.time() // 60)

    def every_device_sent_both():
        return all(stored_uploads(app, device_id) for device_id in PUBLISHED_DAYS)

    napping_until(every_device_sent_both, monkeypatch)
    with waitress_server(app) as port:
        status = simulate("--url", f"http://127.0.0.1:{port}", "--live", "--every", "0.05")
    minutes_now = range(first_minute, int(time.time() // 60) + 1)
    printed = capsys.readouterr()
    assert (status, printed.err) == (0, "")
    first, last = printed.out.splitlines()
    assert first == (f"simulator: live to http://127.0.0.1:{port}, a heartbeat every 0.05 s from each of 5 devices; "
                     "Ctrl+C stops")
    assert re.fullmatch(r"simulator: stopped; \d+ requests sent, 0 failed", last)
    minutes = {device_id: stored_minutes(app, device_id) for device_id in PUBLISHED_DAYS}
    assert all(minutes.values())  # every device sent
    assert set().union(*minutes.values()) <= set(minutes_now)  # stamped with the time


def test_live_goes_on_while_fleetmon_stops_answering_and_says_so_once_each_way(capsys, monkeypatch):
    """As when fleetmon is restarted during a demo: the fleet goes on, what it sends
    meanwhile is lost, as a real device's would be."""
    posts, lock = [], threading.Lock()

    def answer(method, path):
        if method != "POST":
            return fleetmon_answer(method, path)
        with lock:
            posts.append(path)
            number = len(posts)
        return b"" if 10 < number <= 20 else http_answer(204)  # the 11th to the 20th unanswered

    napping_until(lambda: len(posts) >= 30, monkeypatch)
    with FakeServer(answer) as server:
        assert simulate("--url", server.url, "--live", "--every", "0.05") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"simulator: live to {server.url}, ")
    assert re.fullmatch(r"simulator: fleetmon stopped answering \(.+\); the fleet goes on and tries it at every send",
                        lines[1])
    assert lines[2] == f"simulator: fleetmon at {server.url} answers again"
    assert re.fullmatch(r"simulator: stopped; \d+ requests sent, 0 failed", lines[3])
    assert len(lines) == 4
