-- Schema version 0: the first layout, as every fleetmon before schema versions made it.
--
-- Never run by fleetmon: upgrade 1 starts from it. It is kept so that the tests and
-- benchmark.py build a database of it as it was: a row per online minute and per upload,
-- each with the device's text id, and the aggregates kept by triggers.

CREATE TABLE heartbeat_minutes (device_id TEXT NOT NULL, minute INTEGER NOT NULL,
                                PRIMARY KEY (device_id, minute)) WITHOUT ROWID;
CREATE TABLE uploads (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, sent_at TEXT NOT NULL,
                      upload_time_ns INTEGER NOT NULL CHECK (upload_time_ns >= 0));
CREATE TABLE listed_devices (device_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE device_stats (device_id TEXT PRIMARY KEY, online_minutes INTEGER NOT NULL DEFAULT 0,
                           first_minute INTEGER, last_minute INTEGER, upload_count INTEGER NOT NULL DEFAULT 0,
                           upload_total_ns INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TRIGGER count_online_minute AFTER INSERT ON heartbeat_minutes BEGIN
    UPDATE device_stats SET online_minutes = online_minutes + 1,
        first_minute = min(coalesce(first_minute, NEW.minute), NEW.minute),
        last_minute = max(coalesce(last_minute, NEW.minute), NEW.minute)
    WHERE device_id = NEW.device_id;
END;
CREATE TRIGGER add_upload AFTER INSERT ON uploads BEGIN
    UPDATE device_stats SET upload_count = upload_count + 1, upload_total_ns = upload_total_ns + NEW.upload_time_ns
    WHERE device_id = NEW.device_id;
END;
