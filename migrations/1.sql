-- Upgrade 1: from the first layout (schema version 0) to the compact one of schema.sql.
--
-- The first layout kept a row per online minute and per upload, each repeating the
-- device's text id, and the aggregates in device_stats. Here the aggregates move to
-- devices as they are (stats are identical before and after), the minutes become the
-- bits of one row per device and hour, and uploads keep their order and take a number.
-- fleetmon runs it, the upgrades after it and then schema.sql in one transaction, with
-- the schema version set at its end; any failure rolls it all back and leaves the
-- database as it was.

DROP TRIGGER count_online_minute;
DROP TRIGGER add_upload;
DROP TABLE IF EXISTS listed_devices;
ALTER TABLE uploads RENAME TO old_uploads;

CREATE TABLE devices (
    device_key      INTEGER PRIMARY KEY,
    device_id       TEXT    NOT NULL,
    online_minutes  INTEGER NOT NULL DEFAULT 0,
    first_minute    INTEGER,
    last_minute     INTEGER,
    upload_count    INTEGER NOT NULL DEFAULT 0,
    upload_total_ns INTEGER NOT NULL DEFAULT 0,
    newest_minute   INTEGER,
    kept_from       INTEGER,
    last_heard_ms   INTEGER,
    down_since_ms   INTEGER,
    uptime          REAL GENERATED ALWAYS AS (
        CASE WHEN online_minutes = 0 THEN 0.0
             WHEN last_minute = first_minute THEN 100.0
             ELSE min(online_minutes * 1.0 / (last_minute - first_minute) * 100, 100.0) END
    ) VIRTUAL
);
CREATE UNIQUE INDEX devices_by_id ON devices (device_id);

CREATE TABLE online_hours (
    device_key INTEGER NOT NULL,
    hour       INTEGER NOT NULL,
    minutes    INTEGER NOT NULL,
    PRIMARY KEY (device_key, hour)
) WITHOUT ROWID;

CREATE TABLE uploads (
    device_key     INTEGER NOT NULL,
    number         INTEGER NOT NULL,
    sent_at        INTEGER NOT NULL,
    upload_time_ns INTEGER NOT NULL CHECK (upload_time_ns >= 0),
    PRIMARY KEY (device_key, number)
) WITHOUT ROWID;

INSERT INTO devices (device_id, online_minutes, first_minute, last_minute, upload_count, upload_total_ns)
SELECT device_id, online_minutes, first_minute, last_minute, upload_count, upload_total_ns
FROM device_stats ORDER BY device_id;

-- Hours and minutes of the hour by floor division, as Python's divmod gives them, so that
-- minutes before 1970 land in the right hour too. A device's minutes are distinct, so
-- their bits' sum is their union.
INSERT INTO online_hours (device_key, hour, minutes)
SELECT device_key, (minute - minute_of_hour) / 60, sum(1 << minute_of_hour)
FROM (SELECT device_id, minute, ((minute % 60) + 60) % 60 AS minute_of_hour FROM heartbeat_minutes)
JOIN devices USING (device_id)
GROUP BY device_key, (minute - minute_of_hour) / 60;

-- sent_at was stored as the device sent it, RFC 3339: a local time to the second, a
-- fraction, then Z or an offset of up to 23:59. The offset is taken off by hand, as
-- SQLite's own reading stops at 14 hours; the fraction is dropped.
INSERT INTO uploads (device_key, number, sent_at, upload_time_ns)
SELECT device_key, row_number() OVER (PARTITION BY device_key ORDER BY id),
       CAST(strftime('%s', substr(sent_at, 1, 19)) AS INTEGER)
       - CASE WHEN offset = 'Z' THEN 0
              ELSE (CASE substr(offset, 1, 1) WHEN '-' THEN -1 ELSE 1 END)
                   * (substr(offset, 2, 2) * 3600 + substr(offset, 5, 2) * 60) END,
       upload_time_ns
FROM (SELECT *, ltrim(substr(sent_at, 20), '.0123456789') AS offset FROM old_uploads)
JOIN devices USING (device_id);

UPDATE devices SET newest_minute = (
    SELECT max(minute) FROM (
        SELECT devices.last_minute AS minute
        UNION ALL
        SELECT max(sent_at) / 60 FROM uploads WHERE uploads.device_key = devices.device_key
    )
);

DROP TABLE heartbeat_minutes;
DROP TABLE old_uploads;
DROP TABLE device_stats;
