-- fleetmon's database, as a new one gets it. Applied at every start, and after the steps
-- of an upgrade from migrations/ in its transaction, so every statement must be safe to
-- run again on an existing database, and writes nothing there: a start must not need
-- free disk space. fleetmon.py marks a new database with its schema version (PRAGMA
-- user_version, SCHEMA_VERSION).

-- Small pages: each write commits a few whole pages to the write-ahead log, and small
-- ones are quicker to write. Only a new database takes it; then it is fixed.
PRAGMA page_size = 1024;

-- WAL lets readers read while a heartbeat is being written, and makes a commit one
-- append to the log. The setting is stored in the database file.
PRAGMA journal_mode = WAL;

-- One row per device ever listed in a devices file: its aggregates, kept in step with
-- the raw telemetry below by the statements that store it, so that GET stats reads one
-- row whatever the history; its retention boundary; its status by fleetmon's clock; and
-- whether the devices file lists it now (one fleetmon a database, so this is a fact).
-- device_key is what the raw tables repeat, so that no row carries the text id.
CREATE TABLE IF NOT EXISTS devices (
    device_key      INTEGER PRIMARY KEY,
    device_id       TEXT    NOT NULL,
    online_minutes  INTEGER NOT NULL DEFAULT 0,
    first_minute    INTEGER,             -- of its heartbeats, in UTC minutes since 1970;
    last_minute     INTEGER,             -- NULL until the first
    upload_count    INTEGER NOT NULL DEFAULT 0,
    upload_total_ns INTEGER NOT NULL DEFAULT 0,  -- exact; the app refuses to overflow it
    newest_minute   INTEGER,             -- of any telemetry: retention counts back from it
    kept_from       INTEGER,             -- a minute: older telemetry was pruned, and is refused
    last_heard_ms   INTEGER,             -- fleetmon's clock, ms since 1970; NULL: never heard
    down_since_ms   INTEGER,             -- when last heard before it went down; NULL unless down
    -- uptime_percent() of fleetmon.py, in SQL, so that the fleet page can be ordered by an
    -- index; test_fleetmon.py holds the two equal to the last bit.
    uptime          REAL GENERATED ALWAYS AS (
        CASE WHEN online_minutes = 0 THEN 0.0
             WHEN last_minute = first_minute THEN 100.0
             ELSE min(online_minutes * 1.0 / (last_minute - first_minute) * 100, 100.0) END
    ) VIRTUAL,
    listed          INTEGER NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX IF NOT EXISTS devices_by_id ON devices (device_id);

-- The fleet page's order: down devices first, longest down first; then worst uptime
-- first; devices that have sent nothing last. A page of it is a walk along this index.
CREATE INDEX IF NOT EXISTS devices_by_concern ON devices (
    down_since_ms IS NULL, down_since_ms, online_minutes = 0 AND upload_count = 0, uptime, device_id
) WHERE listed;
-- Counting the down and the never-heard devices of the devices file reads only these
-- entries. Neither index changes when a heard device is heard again.
CREATE INDEX IF NOT EXISTS devices_down ON devices (listed, down_since_ms) WHERE down_since_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS devices_never_heard ON devices (listed, last_heard_ms) WHERE last_heard_ms IS NULL;

-- A device's online minutes, an hour a row: bit m of `minutes` is minute m of the hour
-- (bits 0-59). A heartbeat sets one bit; a retry finds it set and changes nothing. So a
-- device's day of heartbeats takes 0.5 KiB (benchmark.py, storage).
CREATE TABLE IF NOT EXISTS online_hours (
    device_key INTEGER NOT NULL,
    hour       INTEGER NOT NULL,  -- UTC hours since 1970-01-01T00:00Z
    minutes    INTEGER NOT NULL,
    PRIMARY KEY (device_key, hour)
) WITHOUT ROWID;

-- Every accepted upload report, numbered per device in the order they arrived.
CREATE TABLE IF NOT EXISTS uploads (
    device_key     INTEGER NOT NULL,
    number         INTEGER NOT NULL,
    sent_at        INTEGER NOT NULL,  -- UTC seconds since 1970, the fraction dropped
    upload_time_ns INTEGER NOT NULL CHECK (upload_time_ns >= 0),
    PRIMARY KEY (device_key, number)
) WITHOUT ROWID;

-- Every outage: from when the device was last heard to when it was heard again.
CREATE TABLE IF NOT EXISTS outages (
    device_key INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER,                -- NULL while it lasts
    PRIMARY KEY (device_key, started_ms)
) WITHOUT ROWID;
-- Retention reads the oldest ended outages and alerts first.
CREATE INDEX IF NOT EXISTS outages_by_end ON outages (ended_ms) WHERE ended_ms IS NOT NULL;

-- The device whose telemetry before kept_from retention is deleting, a step at a time:
-- written with the boundary, so that a restart finishes what a kill interrupted.
CREATE TABLE IF NOT EXISTS pruning (
    device_key INTEGER PRIMARY KEY,
    kept_from  INTEGER NOT NULL
);

-- Every change of status, written in the transaction that makes the change, and marked
-- delivered once the alert URL took it (an outbox: a crash before delivery loses none).
CREATE TABLE IF NOT EXISTS alerts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: receivers drop repeats by it
    device_key    INTEGER NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('down', 'up')),
    at_ms         INTEGER NOT NULL,    -- when fleetmon noticed
    last_heard_ms INTEGER NOT NULL,    -- when the device was last heard before it
    delivered     INTEGER NOT NULL DEFAULT 0  -- 0 waiting, 1 delivered, 2 refused by the receiver
);
CREATE INDEX IF NOT EXISTS alerts_to_deliver ON alerts (id) WHERE NOT delivered;
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (at_ms);

-- How telemetry is stored: fleetmon.py inserts one row into one of these views, and the
-- view's trigger does the rest inside that one statement, so that it commits all or
-- nothing, refusals included (RAISE rolls the statement back). One statement a request
-- also keeps the devices' worker from giving up Python's GIL to waitress's socket thread between
-- statements, which costs more than the statements: the same writes as five statements
-- from Python had 0.60-0.80 times the throughput (benchmark.py, closed loop).

-- A device heard: its newest minute (retention counts back from it) and when fleetmon
-- heard it.
CREATE VIEW IF NOT EXISTS heard (device_key, minute, heard_at_ms) AS SELECT NULL, NULL, NULL WHERE false;
CREATE TRIGGER IF NOT EXISTS note_heard INSTEAD OF INSERT ON heard
BEGIN
    -- A sent_at from a clock far ahead must not make retention prune the device's real
    -- history: the newest minute goes no further than a day past fleetmon's own clock.
    -- (A subquery names that bound, not UPDATE ... FROM, which SQLite runs through
    -- temporary tables, on every heartbeat and upload.)
    UPDATE devices SET newest_minute = (SELECT max(coalesce(newest_minute, bound), bound)
                                        FROM (SELECT min(NEW.minute, NEW.heard_at_ms / 60000 + 1440) AS bound)),
                       last_heard_ms = NEW.heard_at_ms
    WHERE device_key = NEW.device_key;
END;
-- A device that was down is up again: its outage ends and an alert is queued.
CREATE TRIGGER IF NOT EXISTS note_up_again INSTEAD OF INSERT ON heard
WHEN (SELECT down_since_ms FROM devices WHERE device_key = NEW.device_key) IS NOT NULL
BEGIN
    INSERT INTO alerts (device_key, status, at_ms, last_heard_ms)
    SELECT device_key, 'up', NEW.heard_at_ms, down_since_ms FROM devices WHERE device_key = NEW.device_key;
    UPDATE outages SET ended_ms = NEW.heard_at_ms
    WHERE device_key = NEW.device_key
      AND started_ms = (SELECT down_since_ms FROM devices WHERE device_key = NEW.device_key);
    -- down_since_ms only when it changes: the fleet page's index holds it.
    UPDATE devices SET down_since_ms = NULL WHERE device_key = NEW.device_key;
END;

-- A heartbeat: its minute's bit set in its hour's row, and counted if it was not set.
-- (hour, minute_bit) is the minute split as Python's divmod splits it, given by the app.
CREATE VIEW IF NOT EXISTS heartbeats (device_key, minute, hour, minute_bit, heard_at_ms)
AS SELECT NULL, NULL, NULL, NULL, NULL WHERE false;
CREATE TRIGGER IF NOT EXISTS store_heartbeat INSTEAD OF INSERT ON heartbeats
BEGIN
    SELECT RAISE(ABORT, 'before the kept history') FROM devices
    WHERE device_key = NEW.device_key AND NEW.minute < kept_from;
    UPDATE devices SET online_minutes = online_minutes + 1,
                       first_minute = min(coalesce(first_minute, NEW.minute), NEW.minute),
                       last_minute = max(coalesce(last_minute, NEW.minute), NEW.minute)
    WHERE device_key = NEW.device_key AND NOT EXISTS (
        SELECT 1 FROM online_hours
        WHERE device_key = NEW.device_key AND hour = NEW.hour AND minutes & NEW.minute_bit);
    INSERT INTO online_hours (device_key, hour, minutes) VALUES (NEW.device_key, NEW.hour, NEW.minute_bit)
    ON CONFLICT (device_key, hour) DO UPDATE SET minutes = minutes | excluded.minutes
    WHERE minutes & excluded.minutes = 0;
    INSERT INTO heard VALUES (NEW.device_key, NEW.minute, NEW.heard_at_ms);
END;

-- An upload: numbered, and added to the device's exact total, which it must not overflow
-- (SQLite would turn the sum into a float).
CREATE VIEW IF NOT EXISTS upload_reports (device_key, minute, sent_at, upload_time_ns, heard_at_ms)
AS SELECT NULL, NULL, NULL, NULL, NULL WHERE false;
CREATE TRIGGER IF NOT EXISTS store_upload INSTEAD OF INSERT ON upload_reports
BEGIN
    SELECT RAISE(ABORT, 'before the kept history') FROM devices
    WHERE device_key = NEW.device_key AND NEW.minute < kept_from;
    SELECT RAISE(ABORT, 'the total would overflow') FROM devices
    WHERE device_key = NEW.device_key AND upload_total_ns > 9223372036854775807 - NEW.upload_time_ns;
    INSERT INTO uploads (device_key, number, sent_at, upload_time_ns)
    SELECT device_key, upload_count + 1, NEW.sent_at, NEW.upload_time_ns FROM devices WHERE device_key = NEW.device_key;
    UPDATE devices SET upload_count = upload_count + 1, upload_total_ns = upload_total_ns + NEW.upload_time_ns
    WHERE device_key = NEW.device_key;
    INSERT INTO heard VALUES (NEW.device_key, NEW.minute, NEW.heard_at_ms);
END;
