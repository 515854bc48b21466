"""Storage beyond the contract: a start that writes nothing, a failed write, the
write-ahead log kept small; upgrading a database an earlier fleetmon wrote; one fleetmon
per database; and retention (retention.py), which prunes the raw history and keeps the
stats whole.
"""

import re
import sqlite3
import subprocess
import types
from contextlib import closing
from pathlib import Path

import pytest

import alerts
import fleetmon
import housekeeping
import retention
import upgrades
from conftest import (
    DEVICE,
    HERE,
    HTML,
    OTHER_DEVICE,
    SENT_AT,
    WallClock,
    devices_file,
    fleet_page,
    fleetmon_command,
    get,
    heartbeat,
    heartbeat_url,
    listed_ids,
    minute_of_day,
    open_app,
    query,
    restarted,
    send,
    send_day,
    server_process,
    start_with,
    stats_url,
    stored,
    stored_minutes,
    stored_uploads,
    strips,
    summary,
    upload,
)
from fleetmon import (
    INT64_MAX,
    SCHEMA_VERSION,
    StartupError,
    create_app,
    minute_to_rfc3339,
    utc_minute,
)
from simulator import PUBLISHED_DAYS, simulated_day

SCHEMA = (HERE / "schema.sql").read_text(encoding="utf-8")


def test_a_start_writes_nothing_to_a_database_it_knows(tmp_path):
    """So that fleetmon starts on a full disk: it needs no room to grow the log."""
    database = tmp_path / "fleetmon.db"
    with open_app(database) as app:
        send(app.test_client(), heartbeat(SENT_AT))
    with closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = database.read_bytes()
        with open_app(database) as again:
            assert again.test_client().get(stats_url()).get_json() == {"uptime": 100.0, "avg_upload_time": "0s"}
            assert Path(f"{database}-wal").stat().st_size == 0
    assert database.read_bytes() == before


# --- A database error, a full disk --------------------------------------------------------


def read_only(database):
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


def on_a_full_disk(database, connect=fleetmon.connect):  # the real one, not a test's stand-in
    db = connect(database)
    db.execute("PRAGMA max_page_count = 1")  # no more pages than it has: a write that needs one fails
    return db


@pytest.mark.parametrize(("broken_connect", "error"), [(read_only, "attempt to write a readonly database"),
                                                       (on_a_full_disk, "database or disk is full")])
def test_a_failed_write_is_a_500_logged_once_in_full_and_the_next_request_starts_afresh(
        app, client, monkeypatch, caplog, broken_connect, error):
    """As when the database file was read-only, or the disk full, and then mended."""
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer 500 as in production
    monkeypatch.setattr(fleetmon, "connect", broken_connect)
    hours = 0  # heartbeats, each in an hour (a row) of its own, until one is a 500
    while client.post(heartbeat_url(), json={"sent_at": minute_of_day(60 * hours)}).status_code == 204:
        hours += 1
        assert hours < 1_000, "the broken connection never failed"
    for hour in range(hours + 1, hours + 3):
        assert client.post(heartbeat_url(), json={"sent_at": minute_of_day(60 * hour)}).status_code == 500
    failures = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage() for record in failures] == [f"POST {heartbeat_url()} failed: OperationalError: {error}"] * 3
    assert [record.exc_info is not None for record in failures] == [True, False, False]
    monkeypatch.undo()
    send(client, heartbeat(minute_of_day(60 * hours)))
    assert len(stored_minutes(app)) == hours + 1


def test_the_write_ahead_log_is_cut_back_after_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(fleetmon, "WAL_SIZE_LIMIT_BYTES", 32 * 1024)
    with open_app(tmp_path / "fleetmon.db") as app:
        client = app.test_client()
        send(client, *(heartbeat(minute_of_day(60 * hour)) for hour in range(300)))
        wal = tmp_path / "fleetmon.db-wal"
        assert wal.stat().st_size > 32 * 1024
        with closing(fleetmon.connect(app.config["DATABASE"])) as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # what the housekeeping does every few seconds
        send(client, heartbeat(minute_of_day(0)))  # the log restarts from its beginning, cut back
        assert wal.stat().st_size <= 32 * 1024


# --- Upgrading a database written by an earlier fleetmon ----------------------------------

# The layout of every fleetmon before schema versions (user_version 0).
FIRST_LAYOUT = (upgrades.MIGRATIONS / "0.sql").read_text(encoding="utf-8")


def first_layout_database(path, days):
    """A database as the first layout's fleetmon left it, holding days {device: [(path, body)]};
    the stats it gave."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(FIRST_LAYOUT)
        db.execute("BEGIN")  # one commit for all: a day's rows, each committed, take seconds of fsync
        db.executemany("INSERT INTO device_stats (device_id) VALUES (?)", ((d,) for d in PUBLISHED_DAYS))
        db.executemany("INSERT INTO listed_devices (device_id) VALUES (?)", ((d,) for d in PUBLISHED_DAYS))
        for device_id, telemetry in days.items():
            for url, body in telemetry:
                if url.endswith("/heartbeat"):
                    db.execute("INSERT OR IGNORE INTO heartbeat_minutes VALUES (?, ?)",
                               (device_id, utc_minute(body["sent_at"])))
                else:
                    db.execute("INSERT INTO uploads (device_id, sent_at, upload_time_ns) VALUES (?, ?, ?)",
                               (device_id, body["sent_at"], body["upload_time"]))
        db.execute("COMMIT")
        return {device_id: fleetmon.device_stats(fleetmon.Aggregates(*row))
                for device_id, *row in db.execute("SELECT * FROM device_stats")}


def everything_in(path):
    """The whole database, schema and rows, to show it was left as it was."""
    with closing(sqlite3.connect(path)) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]
        return (db.execute("PRAGMA user_version").fetchone(), db.execute("SELECT * FROM sqlite_schema").fetchall(),
                {table: db.execute(f"SELECT * FROM {table}").fetchall() for table in tables})


def definitions(path):
    """Every table, index, view and trigger of a database, as its SQL defines it, without
    the comments and layout: a table keeps the text it was created with, and an upgrade
    that adds a column appends to that text."""
    def bare(sql):
        sql = re.sub(r"\s+", " ", re.sub(r"--[^\n]*", "", sql or ""))
        return re.sub(r" ?([(),]) ?", r"\1", sql).strip()

    with closing(sqlite3.connect(path)) as db:
        return sorted((kind, name, bare(sql)) for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_schema"))


FIRST_DEVICE = "26-9a-66-01-33-83"
ODD_DAYS = {  # uploads only, sent with offsets; heartbeats only, one before 1970; one minute alone
    DEVICE: [upload(7, "2024-01-01T12:04:59.999999999+02:00"), upload(INT64_MAX - 9, "2024-01-01T05:04:00-05:00"),
             upload(1, "2024-01-02T02:04:00.5+23:59"), upload(1, "2023-12-31T14:04:00-20:00")],
    OTHER_DEVICE: [heartbeat(sent_at, OTHER_DEVICE)
                   for sent_at in ("1969-12-31T23:59:00Z", "1970-01-01T00:00:00Z", "1970-01-01T01:30:00Z")],
    FIRST_DEVICE: [heartbeat(SENT_AT, FIRST_DEVICE)],
}
SIMULATED_DAYS = {device_id: [(event.path, event.body) for event in simulated_day(device_id)]
                  for device_id in PUBLISHED_DAYS}
UPGRADED = (r"upgraded database {database} from schema version {version} to {SCHEMA_VERSION}: {rows} rows written "
            r"in \d+\.\d s, [\d,]+\.\d MiB before, [\d,]+\.\d MiB after")
UPGRADING = (r"fleetmon: upgrading database {database} \([\d,]+\.\d MiB\) from schema version {version}; "
             r"stopped before it is done, it is left as it was")


def upgrade_lines(database, version, rows=r"[\d,]+"):
    """The line an upgrade prints as it begins, and the one the start tells after it, as patterns."""
    values = {"database": re.escape(str(database)), "version": version, "SCHEMA_VERSION": SCHEMA_VERSION, "rows": rows}
    return UPGRADING.format(**values), UPGRADED.format(**values)


@pytest.mark.parametrize("days", [SIMULATED_DAYS, ODD_DAYS], ids=["the simulator's day", "odd cases"])
def test_a_first_layout_database_is_upgraded_with_identical_stats(tmp_path, capsys, days):
    database = tmp_path / "old.db"
    before = first_layout_database(database, days)
    with open_app(database) as app:
        client = app.test_client()
        assert {device_id: client.get(stats_url(device_id)).get_json() for device_id in PUBLISHED_DAYS} == before
        upgrading, upgraded = upgrade_lines(database, 0)
        assert re.fullmatch(upgrading + "\n", capsys.readouterr().out)
        assert re.fullmatch(upgraded, app.config["UPGRADED"])
        for device_id, telemetry in days.items():  # the raw telemetry came along too
            minutes = {utc_minute(body["sent_at"]) for url, body in telemetry if url.endswith("/heartbeat")}
            assert stored_minutes(app, device_id) == sorted(minutes)
            uploads = [body for url, body in telemetry if url.endswith("/stats")]
            assert stored_uploads(app, device_id) == [
                (number, int(fleetmon.utc_datetime(body["sent_at"]).timestamp()), body["upload_time"])
                for number, body in enumerate(uploads, start=1)]
        assert query(app, "SELECT count(*) FROM devices WHERE listed") == [(len(PUBLISHED_DAYS),)]
        with restarted(app) as again:  # and the next start has nothing to upgrade
            assert again.config["UPGRADED"] is None
    assert capsys.readouterr().out == ""


# An earlier schema version, as today's schema changed back.
VERSION_2 = [
    # Version 3 lists the devices of the devices file in a column, and the indexes of the
    # fleet page cover only those.
    "DROP INDEX devices_by_concern", "DROP INDEX devices_down", "DROP INDEX devices_never_heard",
    "ALTER TABLE devices DROP COLUMN listed",
    ("CREATE INDEX devices_by_concern ON devices ("
     "down_since_ms IS NULL, down_since_ms, online_minutes = 0 AND upload_count = 0, uptime, device_id)"),
    "CREATE INDEX devices_down ON devices (down_since_ms) WHERE down_since_ms IS NOT NULL",
    "CREATE INDEX devices_never_heard ON devices (last_heard_ms) WHERE last_heard_ms IS NULL",
    # Retention's work under way, and the indexes it reads.
    "DROP TABLE pruning", "DROP INDEX outages_by_end", "DROP INDEX alerts_by_time",
]
EARLIER_VERSIONS = {
    "version 2": (2, VERSION_2),
    # As first released: writes in Python, not through views, and the never-heard devices
    # indexed by key.
    "version 1 as first released": (1, [
        *VERSION_2, "DROP VIEW heard", "DROP VIEW heartbeats", "DROP VIEW upload_reports",  # and their triggers
        "DROP INDEX devices_never_heard",
        "CREATE INDEX devices_never_heard ON devices (device_key) WHERE last_heard_ms IS NULL",
    ]),
    # Later: note_heard with UPDATE ... FROM.
    "version 1 with note_heard's first form": (1, [*VERSION_2, "DROP TRIGGER note_heard", """
        CREATE TRIGGER note_heard INSTEAD OF INSERT ON heard BEGIN
            UPDATE devices SET newest_minute = max(coalesce(newest_minute, bounded.minute), bounded.minute),
                               last_heard_ms = NEW.heard_at_ms
            FROM (SELECT min(NEW.minute, NEW.heard_at_ms / 60000 + 1440) AS minute) AS bounded
            WHERE device_key = NEW.device_key;
        END"""]),
}


@pytest.mark.parametrize("form", EARLIER_VERSIONS)
def test_an_earlier_version_is_upgraded_to_the_schema_a_new_database_gets(tmp_path, form):
    version, statements = EARLIER_VERSIONS[form]
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    with open_app(new):
        pass
    with open_app(old) as app:
        send_day(app.test_client(), simulated_day(FIRST_DEVICE)[:150])  # heartbeats and uploads
    with closing(sqlite3.connect(old, isolation_level=None)) as db:
        for statement in statements:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
    _, _, rows = everything_in(old)
    told = []
    with closing(fleetmon.connect(old)) as db:  # the upgrade's one transaction, without the start's after it
        upgraded = upgrades.upgrade(db, old, SCHEMA, announce=told.append)
    upgrading_line, upgraded_line = upgrade_lines(old, version, rows="0")
    assert [re.fullmatch(upgrading_line, line) is not None for line in told] == [True]
    assert re.fullmatch(upgraded_line, upgraded)
    version_after, _, rows_after = everything_in(old)
    # Every row as it was; the devices not yet listed: the start lists them next.
    assert (version_after, rows_after) == ((SCHEMA_VERSION,), {
        **rows, "devices": [(*device, 0) for device in rows["devices"]], "pruning": []})
    assert definitions(old) == definitions(new)


class Eager:
    """A connection whose progress handler SQLite calls every ten steps of a statement, not
    every million: a small upgrade's statements take as many words as a large one's."""

    def __init__(self, db):
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def set_progress_handler(self, handler, steps):
        self._db.set_progress_handler(handler, min(steps, 10))


def test_a_long_upgrade_tells_its_progress(tmp_path, monkeypatch):
    database = tmp_path / "old.db"
    first_layout_database(database, ODD_DAYS)
    monkeypatch.setattr(upgrades, "UPGRADE_PROGRESS_SECONDS", 0)  # a word at every call of the handler
    told = []
    with closing(fleetmon.connect(database)) as db:
        upgrades.upgrade(Eager(db), database, SCHEMA, announce=told.append)
    assert len(told) > 1 and set(told[1:]) == {"fleetmon: still upgrading, 0 s so far"}


def test_an_upgrade_gives_back_the_space_it_freed(tmp_path):
    """The first layout's row a minute becomes a bit of a row an hour: most of the file is
    free pages after, which the upgrade gives back to the disk."""
    database = tmp_path / "old.db"
    days = {device_id: [heartbeat(minute_of_day(minute), device_id) for minute in range(3_000)]
            for device_id in sorted(PUBLISHED_DAYS)[:3]}
    before = first_layout_database(database, days)
    size = database.stat().st_size
    with open_app(database) as app:
        assert {device_id: app.test_client().get(stats_url(device_id)).get_json() for device_id in days} == {
            device_id: before[device_id] for device_id in days}
    assert database.stat().st_size < size / 2


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path):
    database = tmp_path / "old.db"
    first_layout_database(database, ODD_DAYS)
    with closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE online_hours (x)")  # in the way of the upgrade, half-way through
    before = everything_in(database)
    with pytest.raises(StartupError) as refused:
        create_app(database=database)
    assert str(refused.value) == (f"cannot upgrade database {database} from schema version 0: "
                                  "table online_hours already exists; it is left as it was")
    assert everything_in(database) == before
    with pytest.raises(StartupError, match="^cannot upgrade"):  # the database let go: not "in use"
        create_app(database=database)


def test_an_upgrade_needing_more_room_than_the_disk_has_is_refused_before_it_begins(tmp_path, monkeypatch):
    database = tmp_path / "old.db"
    first_layout_database(database, ODD_DAYS)
    before = everything_in(database)
    monkeypatch.setattr(upgrades.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    with pytest.raises(StartupError) as refused:
        create_app(database=database)
    assert re.fullmatch(rf"upgrading database {re.escape(str(database))} from schema version 0 needs about \d+ MiB "
                        r"free on its disk, and 0 MiB are; it is left as it was", str(refused.value))
    assert everything_in(database) == before


def test_a_database_from_a_newer_fleetmon_is_refused_untouched(tmp_path, capsys):
    database = tmp_path / "newer.db"
    with closing(sqlite3.connect(database)) as db:
        db.execute("CREATE TABLE from_the_future (x)")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = database.read_bytes()
    refusal = (f"fleetmon: database {database} was written by a newer fleetmon (schema version "
               f"{SCHEMA_VERSION + 1}, this one knows up to {SCHEMA_VERSION}); it is left as it was\n")
    assert start_with(capsys, "--port", 0, "--db", database) == (1, refusal)
    assert database.read_bytes() == before


def test_a_connection_given_back_to_a_closed_or_full_pool_is_closed(tmp_path):
    """A request that outlives its app (a test's, a server stopping) closes its connection."""
    pool = fleetmon.ConnectionPool(tmp_path / "pool.db")
    lent = [pool.borrow() for _ in range(fleetmon.IDLE_CONNECTIONS_KEPT + 1)]
    for db in lent:
        pool.give_back(db)
    late = pool.borrow()
    pool.close()
    pool.give_back(late)
    for db in lent:  # the one too many at once, then the idle ones at the close, then the late one
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            db.execute("SELECT 1")


# --- One fleetmon per database ------------------------------------------------------------


def in_use(database):
    return f"database {database} is in use by another fleetmon (--db chooses another)"


def test_a_second_fleetmon_on_a_database_in_use_is_refused_until_the_first_stops(app, tmp_path):
    database = app.config["DATABASE"]
    for devices in (None, devices_file(tmp_path, DEVICE, "cam-1")):  # whatever its devices file
        with pytest.raises(StartupError) as refused:
            create_app(database=database, **({"devices_csv": devices} if devices else {}))
        assert str(refused.value) == in_use(database)
    with open_app(tmp_path / "other.db"):  # another database beside it is another fleetmon's
        pass
    fleetmon.close_storage(app)
    with open_app(database) as again:
        assert again.test_client().get(stats_url()).status_code == 204


def test_a_second_fleetmon_process_stops_with_one_line_until_the_first_is_killed(tmp_path):
    database = tmp_path / "fleetmon.db"
    with server_process("--port", 0, "--db", database) as (first, *_):
        second = subprocess.run(fleetmon_command("--port", 0, "--db", database),
                                capture_output=True, text=True, timeout=60, check=False)
        assert (second.returncode, second.stdout, second.stderr) == (1, "", f"fleetmon: {in_use(database)}\n")
        first.kill()  # SIGKILL: no clean stop, the lock goes with the process
        first.wait()
    with server_process("--port", 0, "--db", database) as (_, port, printed, _):
        assert "listening on" in printed[-1]
        assert get(port, stats_url()) == (204, b"")


def listed(app):
    client = app.test_client()
    return {
        view: [device["device_id"] for device in client.get(view).get_json()["devices"]]
        for view in ("/debug/devices", "/api/v1/devices")
    } | {"/": listed_ids(fleet_page(client))}


def test_a_restart_with_another_devices_file_lists_its_devices_alone_and_forgets_no_history(app, client, tmp_path):
    send(client, heartbeat(SENT_AT), heartbeat(SENT_AT, OTHER_DEVICE))
    stats = client.get(stats_url(OTHER_DEVICE)).get_json()
    with restarted(app, devices_file(tmp_path, DEVICE, "cam-1")) as fewer:
        fewer_client = fewer.test_client()
        assert listed(fewer) == {"/debug/devices": [DEVICE, "cam-1"], "/api/v1/devices": [DEVICE, "cam-1"],
                                 "/": [DEVICE, "cam-1"]}
        assert summary(fleet_page(fewer_client)) == {"Devices": "2", "Down": "0", "Up": "1", "Never heard": "1"}
        assert fewer_client.get(stats_url(OTHER_DEVICE)).status_code == 404
    with open_app(app.config["DATABASE"]) as everything:
        assert sorted(listed(everything)["/"]) == listed(everything)["/api/v1/devices"] == sorted(PUBLISHED_DAYS)
        assert everything.test_client().get(stats_url(OTHER_DEVICE)).get_json() == stats


# --- Retention ----------------------------------------------------------------------------


def prune_all(app, keep_days, now_ms=None):
    """Prune to the end, as the housekeeping does from its start; how many steps it took."""
    with closing(fleetmon.connect(app.config["DATABASE"])) as db:
        pruning, steps = retention.Pruning(db, keep_days, app.config["DEVICE_KEYS"]), 0
        while pruning.step(db, fleetmon.now_ms() if now_ms is None else now_ms):
            steps += 1
    return steps


def assert_refused(app, client, path, body, status, msg):
    before = stored(app)
    response = client.post(path, json=body)
    assert (response.status_code, response.get_json()) == (status, {"msg": msg})
    assert stored(app) == before


def kept_history_message(kept_from):
    return (f"sent_at is before {minute_to_rfc3339(kept_from)}, where this device's kept history begins "
            "(older telemetry is pruned); nothing was stored")


def test_pruning_keeps_the_stats_and_refuses_what_it_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "ROWS_PER_STEP", 10)  # many small steps
    with open_app(tmp_path / "fleetmon.db") as app:
        client = app.test_client()
        day = 24 * 60
        sent = [minute_of_day(minute) for minute in range(0, 4 * day, 7)]
        send(client, *(heartbeat(sent_at) for sent_at in sent), *(upload(n, sent_at) for n, sent_at in enumerate(sent)))
        send(client, *(heartbeat(sent_at, OTHER_DEVICE) for sent_at in sent[:50]))
        stats = {device_id: client.get(stats_url(device_id)).get_json() for device_id in (DEVICE, OTHER_DEVICE)}
        other_before = (stored_minutes(app, OTHER_DEVICE), stored_uploads(app, OTHER_DEVICE))

        assert prune_all(app, keep_days=1) > 10
        kept_from = (utc_minute(sent[-1]) - day) // 60 * 60  # a whole hour
        assert stored_minutes(app) == [m for m in map(utc_minute, sent) if m >= kept_from]
        assert [upload[1] // 60 for upload in stored_uploads(app)] == [m for m in map(utc_minute, sent) if m >= kept_from]
        assert {device_id: client.get(stats_url(device_id)).get_json() for device_id in stats} == stats
        # The other device's history is its own: its newest minute is days older, and all of it is kept.
        assert (stored_minutes(app, OTHER_DEVICE), stored_uploads(app, OTHER_DEVICE)) == other_before

        late = minute_to_rfc3339(kept_from - 1)
        for path, body in (heartbeat(sent[0]), heartbeat(late), upload(5, late)):
            assert_refused(app, client, path, body, 409, kept_history_message(kept_from))
        send(client, heartbeat(minute_to_rfc3339(kept_from)))  # the first minute kept is taken
        assert client.get(f"/debug/stats/{DEVICE}").get_json()["history_kept_from"] == minute_to_rfc3339(kept_from)
        assert prune_all(app, keep_days=1) == 0  # nothing more until its window moves an hour on


def test_the_strip_shows_only_the_kept_history(app, client):
    # Heartbeats at 1969-12-31 23:59 and 1970-01-01 00:10, an upload a day later: the kept
    # history begins at minute 0, and then, after another upload, after every heartbeat.
    send(client, heartbeat("1969-12-31T23:59:00Z"), heartbeat("1970-01-01T00:10:00Z"), upload(1, "1970-01-02T00:30:00Z"))
    prune_all(app, keep_days=1)
    assert strips(fleet_page(client))[0][:3] == ("1 of 10 minutes online", "1970-01-01T00:00:00Z", "1970-01-01T00:10:00Z")
    send(client, upload(1, "1970-01-03T00:30:00Z"))
    prune_all(app, keep_days=1)
    page = fleet_page(client)
    assert strips(page) == [] and page.count("no heartbeats in its kept history") == 1
    device_page = client.get(f"/devices/{DEVICE}", headers=HTML).get_data(as_text=True)
    assert strips(device_page) == [] and "no heartbeats in its kept history" in device_page


def test_a_device_clock_a_day_ahead_cannot_make_retention_refuse_the_present(app, client, monkeypatch):
    wall = WallClock(monkeypatch)  # 2024-01-01T10:04:00Z
    send(client, heartbeat(SENT_AT), heartbeat("2024-01-02T10:04:00Z"))  # a day ahead: the most fleetmon takes
    prune_all(app, keep_days=1, now_ms=wall.ms)
    send(client, heartbeat("2024-01-01T10:00:00Z"), heartbeat("2024-01-01T10:05:00Z"))  # still taken


def test_pruning_killed_half_way_is_finished_by_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setattr(retention, "ROWS_PER_STEP", 10)
    wall = WallClock(monkeypatch)
    with open_app(tmp_path / "fleetmon.db", keep_days=1) as app:
        client = app.test_client()
        send(client, *(heartbeat(minute_of_day(60 * hour)) for hour in range(-48, 1)))  # an hour a row
        kept_from = utc_minute("2023-12-31T10:00:00Z")
        with closing(fleetmon.connect(app.config["DATABASE"])) as db:
            assert retention.Pruning(db, 1, app.config["DEVICE_KEYS"]).step(db, wall.ms)  # then killed
        assert query(app, "SELECT device_key, kept_from FROM pruning") == [(app.config["DEVICE_KEYS"][DEVICE], kept_from)]
        assert len(stored_minutes(app)) == 49 - 10
        assert_refused(app, client, *heartbeat("2023-12-30T10:00:00Z"), 409, kept_history_message(kept_from))

        with restarted(app, keep_days=1) as again:
            keeping = housekeeping.Housekeeping(again, announce=[].append)  # not started: the test runs its rounds
            try:
                keeping.round(0.0, wall.ms)
                while keeping.pruning_busy:
                    keeping.round(0.0, wall.ms)
            finally:
                keeping.close()
            assert query(again, "SELECT * FROM pruning") == []
            assert stored_minutes(again) == [minute for minute in range(kept_from, utc_minute(SENT_AT), 60)]


def test_the_kept_history_moves_only_with_the_note_that_finishes_its_pruning(app, client):
    """The boundary and the note of the rows to prune before it are one transaction: a
    boundary moved without its note would leave rows that no restart prunes."""
    send(client, heartbeat("2023-12-29T10:00:00Z"), heartbeat(SENT_AT))
    query(app, "CREATE TRIGGER no_room BEFORE INSERT ON pruning BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        prune_all(app, keep_days=1)
    assert query(app, "SELECT kept_from FROM devices WHERE device_id = ?", (DEVICE,)) == [(None,)]
    assert len(stored_minutes(app)) == 2


def test_retention_follows_the_devices_heard_while_it_runs(tmp_path, monkeypatch):
    wall = WallClock(monkeypatch)
    with open_app(tmp_path / "fleetmon.db", keep_days=1) as app:
        keeping = housekeeping.Housekeeping(app, announce=[].append)
        try:
            keeping.round(0.0, wall.ms)
            assert not keeping.pruning_busy  # nothing heard yet
            send(app.test_client(), heartbeat("2023-12-29T10:00:00Z"), heartbeat(SENT_AT))  # heard: looked at
            keeping.round(1.0, wall.ms)
            assert keeping.pruning_busy
        finally:
            keeping.close()
        assert stored_minutes(app) == [utc_minute(SENT_AT)]


def test_retention_prunes_the_alerts_dealt_with_and_the_outages_ended_before_the_kept_days(app, monkeypatch):
    monkeypatch.setattr(retention, "ROWS_PER_STEP", 2)
    day_ms, now = 24 * 3_600_000, 1_704_103_440_000
    old, recent = now - day_ms - 1, now - day_ms + 1
    key = app.config["DEVICE_KEYS"][DEVICE]
    with closing(fleetmon.connect(app.config["DATABASE"])) as db, fleetmon.transaction(db):
        for at_ms, delivered in [(old, alerts.DELIVERED), (old, alerts.REFUSED), (old, alerts.WAITING),
                                 (old, alerts.DELIVERED), (old, alerts.DELIVERED), (recent, alerts.DELIVERED)]:
            alerts.queue(db, key, "down", at_ms, at_ms - 1000)
            db.execute("UPDATE alerts SET delivered = ? WHERE id = (SELECT max(id) FROM alerts)", (delivered,))
        db.executemany("INSERT INTO outages (device_key, started_ms, ended_ms) VALUES (?, ?, ?)",
                       [(key, 1, old), (key, 2, None), (key, 3, recent), (key, 4, old - 5), (key, 5, old - 9)])
    assert prune_all(app, keep_days=1, now_ms=now) == 2  # two alerts and two outages a step
    # What is still to be delivered stays, however old; an outage stays while it lasts.
    assert query(app, "SELECT id, delivered FROM alerts ORDER BY id") == [(3, alerts.WAITING), (6, alerts.DELIVERED)]
    assert query(app, "SELECT started_ms FROM outages ORDER BY started_ms") == [(2,), (3,)]


def test_after_a_write_fails_on_a_full_disk_the_write_ahead_log_is_emptied_for_the_next(app, client, monkeypatch):
    """So that space freed on the disk serves the next writes at once, rather than the
    log's growth, until the next periodic checkpoint."""
    send(client, *(heartbeat(minute_of_day(60 * hour)) for hour in range(20)))
    wal = app.config["DATABASE"].with_name(app.config["DATABASE"].name + "-wal")
    assert wal.stat().st_size > 0
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer 500 as in production
    emptied = []
    monkeypatch.setattr(fleetmon, "make_room", lambda database: emptied.append(database))
    with monkeypatch.context() as full:
        full.setattr(fleetmon, "connect", on_a_full_disk)
        app.extensions["fleetmon.pool"].close()  # no idle connection of the roomy kind left
        app.extensions["fleetmon.pool"] = fleetmon.ConnectionPool(app.config["DATABASE"])
        hours = 20
        while client.post(heartbeat_url(), json={"sent_at": minute_of_day(60 * hours)}).status_code == 204:
            hours += 1
    assert emptied == [app.config["DATABASE"]]
    monkeypatch.undo()
    with closing(fleetmon.connect(app.config["DATABASE"])):  # held open: else the last close removes the log
        send(client, heartbeat(minute_of_day(60 * hours)))
        assert wal.stat().st_size > 0
        fleetmon.make_room(app.config["DATABASE"])  # the real one
        assert wal.stat().st_size == 0
