-- Several instances on one database (throttled/cluster.py): each registers itself, and owns
-- portals through lease rows that its heartbeat renews and that another instance takes over
-- once they expire. Every instant here is the database's (now()), never an instance's own
-- clock, so that instances whose clocks disagree agree on who owns what.
-- depends: 0005.queue-operations

CREATE TABLE instances (
    id            text PRIMARY KEY,                   -- random, one per process start
    name          text NOT NULL,                      -- cluster.instance_name, or hostname:pid
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz                         -- set by a graceful stop
);

-- One row per portal that an instance owns or owned: a lease is valid while expires_at is
-- ahead of now(). An expired row keeps its owner, so that whoever takes the portal over
-- knows whose claims it inherits.
CREATE TABLE portal_leases (
    portal_id    bigint PRIMARY KEY,
    instance_id  text NOT NULL REFERENCES instances (id),
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX portal_leases_instance ON portal_leases (instance_id);
