-- Operator steering of queues (pause, release as FAIL_CONTINUE), what each queue's rate was
-- resolved from (so a config change can re-resolve it), and a change counter that other
-- instances poll as the backstop to LISTEN/NOTIFY.
-- depends: 0004.audit-log

ALTER TABLE queues
    ADD COLUMN action_id bigint,            -- the action definition of the latest intake
    ADD COLUMN inputs jsonb,                -- the rate input fields of the latest intake
    ADD COLUMN paused_at timestamptz,       -- set while an operator holds the queue
    ADD COLUMN releasing boolean NOT NULL DEFAULT false;  -- pending rows marked complete_as

-- A queue created before this migration: its action definition is in its key.
UPDATE queues SET action_id = split_part(key, ':', 4)::bigint
WHERE key ~ '^queue:[0-9]{1,18}:[0-9]{1,18}:[0-9]{1,18}:[0-9]{1,18}$';
CREATE INDEX queues_portal_action ON queues (portal_id, action_id);

-- An action an operator released (fail-pending): completed with this state, not the queue's
-- rate. NULL: a normal completion (SUCCESS).
ALTER TABLE actions ADD COLUMN complete_as text;
ALTER TABLE actions ADD CONSTRAINT actions_complete_as
    CHECK (complete_as IS NULL OR complete_as = 'FAIL_CONTINUE') NOT VALID;

CREATE TABLE change_counter (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    version  bigint NOT NULL
);
INSERT INTO change_counter (id, version) VALUES (true, 0);

-- Failed and expired rows by queue (queue listings, retry-failed); only finished rows that
-- did not complete, so a completion (done) costs no index entry.
CREATE INDEX actions_unfinished_by_queue ON actions (queue_id, state)
    WHERE state IN ('failed', 'expired');

-- What each queue's policy was resolved from, for queues holding actions when this was
-- applied (intake records it from now on): the newest pending action's rate fields.
UPDATE queues q SET inputs = (
    SELECT a.input_fields - 'priority' - 'queueName' FROM actions a
    WHERE a.queue_id = q.id AND a.state = 'pending' AND jsonb_typeof(a.input_fields) = 'object'
    ORDER BY a.id DESC LIMIT 1
)
WHERE q.inputs IS NULL;
