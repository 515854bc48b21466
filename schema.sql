-- fleetmon's database. Applied at every start, so every statement must be safe to run
-- again on an existing database.

-- Small pages: each write commits a few whole pages to the WAL, and small ones are
-- quicker to write (README.md, "Performance"). Only a new database takes it; then it is fixed.
PRAGMA page_size = 1024;

-- WAL lets GET stats read while a heartbeat is being written, and makes a commit one
-- append to the log. The setting is stored in the database file.
PRAGMA journal_mode = WAL;

-- One row per minute in which a device sent at least one heartbeat. The primary key is
-- what makes a retried heartbeat count once.
CREATE TABLE IF NOT EXISTS heartbeat_minutes (
    device_id TEXT    NOT NULL,
    minute    INTEGER NOT NULL,  -- whole UTC minutes since 1970-01-01T00:00:00Z
    PRIMARY KEY (device_id, minute)
) WITHOUT ROWID;

-- Every accepted upload report.
CREATE TABLE IF NOT EXISTS uploads (
    id             INTEGER PRIMARY KEY,
    device_id      TEXT    NOT NULL,
    sent_at        TEXT    NOT NULL,  -- RFC 3339, exactly as the device sent it
    upload_time_ns INTEGER NOT NULL CHECK (upload_time_ns >= 0)
);

-- The devices of the devices file as of the latest start: what the fleet page and the
-- debug views list. A device dropped from the file keeps its telemetry and its row below.
CREATE TABLE IF NOT EXISTS listed_devices (
    device_id TEXT PRIMARY KEY
) WITHOUT ROWID;

-- The aggregates GET stats reads, one row per known device, so that its cost does not
-- grow with the history. A row whose counts are both zero is a device that has sent
-- nothing yet. The triggers below keep it in step with the two tables above, in the
-- statement that inserts into them.
CREATE TABLE IF NOT EXISTS device_stats (
    device_id       TEXT PRIMARY KEY,
    online_minutes  INTEGER NOT NULL DEFAULT 0,
    first_minute    INTEGER,             -- NULL until the first heartbeat
    last_minute     INTEGER,
    upload_count    INTEGER NOT NULL DEFAULT 0,
    upload_total_ns INTEGER NOT NULL DEFAULT 0  -- exact; the app refuses to overflow it
) WITHOUT ROWID;

-- A heartbeat in a minute already stored inserts nothing, and so fires nothing.
CREATE TRIGGER IF NOT EXISTS count_online_minute AFTER INSERT ON heartbeat_minutes
BEGIN
    UPDATE device_stats
    SET online_minutes = online_minutes + 1,
        first_minute = min(coalesce(first_minute, NEW.minute), NEW.minute),
        last_minute = max(coalesce(last_minute, NEW.minute), NEW.minute)
    WHERE device_id = NEW.device_id;
END;

CREATE TRIGGER IF NOT EXISTS add_upload AFTER INSERT ON uploads
BEGIN
    UPDATE device_stats
    SET upload_count = upload_count + 1,
        upload_total_ns = upload_total_ns + NEW.upload_time_ns
    WHERE device_id = NEW.device_id;
END;
