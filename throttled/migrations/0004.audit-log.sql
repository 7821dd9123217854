-- Every change made through the admin API or the CLI: who, what, on what, before and after.
-- depends: 0003.portal-connections

CREATE TABLE audit_log (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,      -- an admin token's id, cli:<unix user>, or oauth
    action  text NOT NULL,      -- e.g. config.set, portal.disconnect
    target  text NOT NULL,      -- e.g. config:62515:7, portal:62515
    before  jsonb,
    after   jsonb
);
CREATE INDEX audit_log_target ON audit_log (target, id);
CREATE INDEX audit_log_at ON audit_log (at);
