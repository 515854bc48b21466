-- Upgrade 2: from schema version 1, the trigger note_heard in its new form.
--
-- The first form named the bound on a device's newest minute with UPDATE ... FROM,
-- which SQLite runs through temporary tables on every heartbeat and upload. The trigger
-- is dropped here, and schema.sql, which fleetmon applies after the upgrades in their
-- transaction, creates it as it is now. (From schema version 0 there is none: upgrade 1
-- makes the tables, schema.sql the rest.)

DROP TRIGGER IF EXISTS note_heard;
