-- throttled: initial schema.
-- depends:

CREATE TABLE queues (
    id          bigserial PRIMARY KEY,
    key         text NOT NULL UNIQUE,
    portal_id   bigint NOT NULL,
    policy      jsonb NOT NULL,            -- resolved at the latest intake (input fields > admin config > defaults)
    override    jsonb,                     -- operator override; wins over everything
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queues_portal ON queues (portal_id);

CREATE TABLE actions (
    id            bigserial PRIMARY KEY,
    callback_id   text NOT NULL UNIQUE,
    queue_id      bigint NOT NULL REFERENCES queues (id),
    portal_id     bigint NOT NULL,
    priority      integer NOT NULL DEFAULT 0,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'claimed', 'done', 'failed', 'expired')),
    received_at   timestamptz NOT NULL DEFAULT now(),
    deadline      timestamptz NOT NULL,      -- HubSpot's block expiration; never sent after it
    not_before    timestamptz,               -- retry backoff / hold
    attempts      integer NOT NULL DEFAULT 0,
    failures      integer NOT NULL DEFAULT 0, -- consecutive failures
    split_group   bigint,                    -- set when a rejected batch is bisected
    claimed_at    timestamptz,               -- when this process reserved it for sending
    sent_at       timestamptz,               -- last dispatch instant (rate log for restarts)
    completed_at  timestamptz,
    last_error    text,
    workflow_id   bigint,
    object_type   text,
    object_id     text,
    input_fields  jsonb
) WITH (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    fillfactor = 90
);
-- The claim path: pending rows of one queue by priority, then arrival.
CREATE INDEX actions_pending ON actions (queue_id, priority DESC, id) WHERE state = 'pending';
CREATE INDEX actions_claimed ON actions (queue_id) WHERE state = 'claimed';
CREATE INDEX actions_deadline ON actions (deadline) WHERE state = 'pending';
CREATE INDEX actions_finished ON actions (completed_at) WHERE state IN ('done', 'failed', 'expired');

-- Sends whose rows no longer carry them (a failed attempt that is retried later): the rate
-- log survives restarts only if every send is somewhere. Rare, so cheap.
CREATE TABLE queue_sends (
    queue_id  bigint NOT NULL,
    sent_at   timestamptz NOT NULL,
    n         integer NOT NULL
);
CREATE INDEX queue_sends_at ON queue_sends (sent_at);

CREATE TABLE portals (
    portal_id          bigint PRIMARY KEY,
    refresh_token      text,                 -- AES-256-GCM, see throttled/crypto.py
    access_token       text,                 -- AES-256-GCM
    access_expires_at  timestamptz,
    connected_at       timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Per (portal, action definition) rate configuration (POST /api/config).
CREATE TABLE action_configs (
    portal_id   bigint NOT NULL,
    action_id   bigint NOT NULL,
    policy      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (portal_id, action_id)
);
