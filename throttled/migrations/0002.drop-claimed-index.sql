-- The claimed-rows index cost an index insert on every claim; only start-up recovery looks
-- for claimed rows, and a sequential pass then is cheaper than maintaining it all the time.
-- depends: 0001.initial

DROP INDEX IF EXISTS actions_claimed;
