-- Upgrade 2: from schema version 1, an index and a trigger in their new forms.
--
-- Version 1 as first released indexed the never-heard devices by key; counting them
-- now reads only that index, by last_heard_ms. Later, the trigger note_heard named the
-- bound on a device's newest minute with UPDATE ... FROM, which SQLite runs through
-- temporary tables on every heartbeat and upload. Both are dropped here, and schema.sql,
-- which fleetmon applies after the upgrades in their transaction, makes them as they are
-- now, with the views and triggers that the first release did not have. (From schema
-- version 0 there are none: upgrade 1 makes the tables, schema.sql the rest.)

DROP INDEX IF EXISTS devices_never_heard;
DROP TRIGGER IF EXISTS note_heard;
