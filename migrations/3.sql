-- Upgrade 3: from schema version 2, one fleetmon per database.
--
-- Which devices the devices file lists was kept by each fleetmon in a temporary table of
-- its own, while two could share a database. Now it is a column, set at every start, and
-- the indexes of the fleet page cover only the listed devices: they are dropped here, and
-- schema.sql, applied after the upgrades in their transaction, makes them anew, with the
-- table of retention's work under way and the indexes retention reads.

ALTER TABLE devices ADD COLUMN listed INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS devices_by_concern;
DROP INDEX IF EXISTS devices_down;
DROP INDEX IF EXISTS devices_never_heard;
