"""Every SQL statement throttled issues, in one place. Parameters are `$n` (asyncpg).

Timestamps that a stored row may carry out of Python's range (a deadline written by an
older version or by hand: PostgreSQL holds years up to 294276, a datetime only up to 9999)
are clamped where they are read, so no row can fail to decode.
"""

# The range of instants read back (1970 to rates.HORIZON): every timestamp decodes.
_HORIZON = "'9999-12-01 00:00:00+00'::timestamptz"
_EPOCH = "'1970-01-01 00:00:00+00'::timestamptz"


def _readable(column: str, *, nullable: bool = False) -> str:
    """A timestamp column clamped to what a datetime holds (BC, year 20000, infinity)."""
    clamped = f"LEAST(GREATEST({column}, {_EPOCH}), {_HORIZON})"  # (GREATEST skips NULL)
    return f"CASE WHEN {column} IS NULL THEN NULL ELSE {clamped} END" if nullable else clamped


_CREATED = _readable("created_at") + " AS created_at"


def _count(counter: str) -> str:
    """A counter as read: within 0..1,000,000 whatever a row edited by hand holds."""
    return f"LEAST(GREATEST({counter}, 0), 1000000)"


def _next(counter: str, step: str = "1") -> str:
    """A counter plus a step that cannot overflow integer."""
    return f"{_count(counter)} + {step}"


# A send recorded far ahead of the database's clock (a row edited by hand, a clock that
# jumped) would hold its queue until then: it counts as a second from now at most (room
# for clocks a little apart, as several instances' may be).
_SOON = "now() + interval '1 second'"

# A queue as the scheduler tracks it.
_QUEUE_COLUMNS = f"""id, key, portal_id, policy, override, {_CREATED},
    paused_at IS NOT NULL AS paused, releasing"""

# -- intake ---------------------------------------------------------------------------------

UPSERT_QUEUES = f"""
INSERT INTO queues (key, portal_id, policy, action_id, inputs)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::jsonb[], $4::bigint[], $5::jsonb[])
ON CONFLICT (key) DO UPDATE SET policy = EXCLUDED.policy, action_id = EXCLUDED.action_id,
    inputs = EXCLUDED.inputs, updated_at = now()
RETURNING {_QUEUE_COLUMNS}
"""

STORED_CALLBACKS = "SELECT callback_id FROM actions WHERE callback_id = ANY($1::text[])"

# $1 is one JSON array of rows, each an array of the nine values in column order (deadline
# in Unix seconds), as text: one document, encoded by orjson, is far cheaper than nine
# arrays encoded element by element (or one jsonb through the json module).
INSERT_ACTIONS = """
INSERT INTO actions (callback_id, queue_id, portal_id, priority, deadline,
                     workflow_id, object_type, object_id, input_fields)
SELECT r->>0, (r->>1)::bigint, (r->>2)::bigint, (r->>3)::int, to_timestamp((r->>4)::float8),
       (r->>5)::bigint, r->>6, r->>7, r->8
FROM jsonb_array_elements($1::text::jsonb) AS r
ON CONFLICT (callback_id) DO NOTHING
"""

# -- scheduling -----------------------------------------------------------------------------

# Queues due at the same moment claim together: one statement, one LATERAL pick per queue.
CLAIM = f"""
WITH req AS (
    SELECT * FROM unnest($1::bigint[], $2::int[]) AS r(queue_id, lim)
), picked AS (
    SELECT p.id
    FROM req, LATERAL (
        SELECT a.id FROM actions a
        WHERE a.queue_id = req.queue_id AND a.state = 'pending'
          AND (a.not_before IS NULL OR a.not_before <= now())
          AND a.deadline > now() AND a.complete_as IS NULL
        ORDER BY a.priority DESC, a.id
        LIMIT req.lim
        FOR UPDATE SKIP LOCKED
    ) p
)
UPDATE actions a SET state = 'claimed', claimed_at = $3
FROM picked WHERE a.id = picked.id
RETURNING a.id, a.callback_id, a.queue_id, a.portal_id, a.priority,
          {_readable("a.deadline")} AS deadline, {_count("a.attempts")} AS attempts,
          {_count("a.failures")} AS failures, a.split_group
"""

# When each queue's earliest held-back row becomes claimable (retry backoff), for queues
# whose claim came back short. A backoff that ended between the claim and this query is
# returned too (in the past): the queue re-arms at once instead of going idle.
NEXT_NOT_BEFORE = f"""
SELECT queue_id, {_readable("min(not_before)")} AS at
FROM actions
WHERE queue_id = ANY($1::bigint[]) AND state = 'pending' AND not_before IS NOT NULL
  AND deadline > now()
GROUP BY queue_id
"""

ACTIVE_QUEUES = f"""
SELECT {_QUEUE_COLUMNS} FROM queues q
WHERE EXISTS (SELECT 1 FROM actions a WHERE a.queue_id = q.id AND a.state = 'pending')
"""

# The same, for some portals only (those an instance just took over, or was told of).
ACTIVE_QUEUES_OF = f"""
SELECT {_QUEUE_COLUMNS} FROM queues q
WHERE q.portal_id = ANY($1::bigint[])
  AND EXISTS (SELECT 1 FROM actions a WHERE a.queue_id = q.id AND a.state = 'pending')
"""

GET_QUEUES = f"SELECT {_QUEUE_COLUMNS} FROM queues WHERE id = ANY($1::bigint[])"

RELEASING_QUEUES = f"SELECT {_QUEUE_COLUMNS} FROM queues WHERE releasing"

# Rows an operator released (fail-pending) go regardless of the queue's rate and pause.
CLAIM_RELEASED = f"""
WITH picked AS (
    SELECT a.id FROM actions a
    WHERE a.queue_id = $1 AND a.state = 'pending' AND a.complete_as IS NOT NULL
      AND (a.not_before IS NULL OR a.not_before <= now()) AND a.deadline > now()
    ORDER BY a.priority DESC, a.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE actions a SET state = 'claimed', claimed_at = $3
FROM picked WHERE a.id = picked.id
RETURNING a.id, a.callback_id, a.queue_id, a.portal_id, a.priority,
          {_readable("a.deadline")} AS deadline, {_count("a.attempts")} AS attempts,
          {_count("a.failures")} AS failures, a.split_group
"""

# The release is over once no released row is pending (one waiting out a backoff still is).
END_RELEASE = """
UPDATE queues q SET releasing = false
WHERE q.id = $1 AND NOT EXISTS (
    SELECT 1 FROM actions a
    WHERE a.queue_id = q.id AND a.state IN ('pending', 'claimed') AND a.complete_as IS NOT NULL
      AND a.deadline > now()
)
RETURNING q.id
"""

# -- results --------------------------------------------------------------------------------

# HubSpot completed these: done, even if meanwhile put back to pending (an outage kept the
# answer from being written before the portal's next owner reset its claimed rows: written
# now, it keeps them from being sent again).
MARK_DONE = f"""
UPDATE actions a
SET state = 'done', completed_at = now(), sent_at = x.sent_at, last_error = NULL,
    attempts = {_next("a.attempts")}, failures = 0
FROM unnest($1::bigint[], $2::timestamptz[]) AS x(id, sent_at)
WHERE a.id = x.id AND a.state IN ('claimed', 'pending')
"""

MARK_RETRY = f"""
UPDATE actions a
SET state = 'pending', not_before = x.not_before, last_error = x.error,
    attempts = {_next("a.attempts", "x.counted")}, failures = CASE WHEN x.counted = 1
        THEN {_next("a.failures")} ELSE a.failures END,
    split_group = x.split_group
FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::int[], $5::bigint[])
     AS x(id, not_before, error, counted, split_group)
WHERE a.id = x.id AND a.state = 'claimed'
"""

MARK_FAILED = f"""
UPDATE actions a
SET state = 'failed', completed_at = now(), last_error = x.error,
    attempts = {_next("a.attempts")}, failures = {_next("a.failures")},
    sent_at = COALESCE(x.sent_at, a.sent_at)
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[]) AS x(id, error, sent_at)
WHERE a.id = x.id AND a.state = 'claimed'
"""

MARK_EXPIRED_CLAIMED = """
UPDATE actions SET state = 'expired', completed_at = now(),
    last_error = 'block expired at HubSpot before it could be sent'
WHERE id = ANY($1::bigint[]) AND state = 'claimed'
"""

RELEASE = """
UPDATE actions SET state = 'pending' WHERE id = ANY($1::bigint[]) AND state = 'claimed'
"""

INSERT_SENDS = """
INSERT INTO queue_sends (queue_id, sent_at, n)
SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::int[])
"""

# -- recovery and maintenance ---------------------------------------------------------------

# Rows claimed by a process that died: their send may or may not have happened.
# Rows of claims whose answer never came (the connection broke after the commit): their
# claimed_at is the claim's own stamp, so they are found, and go back to pending.
RELEASE_UNANSWERED = """
UPDATE actions SET state = 'pending'
WHERE state = 'claimed' AND claimed_at = ANY($1::timestamptz[])
RETURNING queue_id
"""

# Rows left claimed for portals an instance takes over (by an instance that died, or lost its
# lease), except those this process holds itself (`$2`). (A sequential pass, as claimed rows
# have no index: run only when a portal changes hands with claims possibly left behind.)
RECOVER_CLAIMED_OF = """
WITH r AS (
    UPDATE actions SET state = 'pending'
    WHERE state = 'claimed' AND portal_id = ANY($1::bigint[]) AND NOT (id = ANY($2::bigint[]))
    RETURNING queue_id
)
SELECT queue_id, count(*)::int AS n FROM r GROUP BY queue_id
"""

# The completion requests of some portals answered in the last `$2` seconds, one row each
# (a request stamps all its rows with one sent_at), by age (from its rows' completed_at: when
# the answer was written, the latest HubSpot can have counted it; an age, so that the
# database's clock and the caller's need not agree). The finished-rows index bounds the pass
# to what completed within the window, whatever the table's size.
RECENT_REQUESTS = """
SELECT portal_id,
       LEAST(GREATEST(extract(epoch FROM now() - max(completed_at)), 0), $2)::float8 AS age_s
FROM actions
WHERE completed_at > now() - $2::float8 * interval '1 second'
  AND state IN ('done', 'failed') AND portal_id = ANY($1::bigint[]) AND sent_at IS NOT NULL
GROUP BY portal_id, sent_at
LIMIT $3
"""

RECENT_SENDS = f"""
SELECT queue_id, LEAST(sent_at, {_SOON}) AS sent_at, count(*)::int AS n FROM actions
WHERE sent_at > $1 AND state IN ('done', 'failed') AND complete_as IS NULL
GROUP BY queue_id, sent_at
UNION ALL
SELECT queue_id, LEAST(sent_at, {_SOON}), LEAST(n, 1000000) FROM queue_sends
WHERE sent_at > $1 AND n > 0
"""

RECENT_SENDS_FOR = f"""
SELECT queue_id, LEAST(sent_at, {_SOON}) AS sent_at, count(*)::int AS n FROM actions
WHERE queue_id = ANY($2::bigint[]) AND sent_at > $1 AND state IN ('done', 'failed')
  AND complete_as IS NULL
GROUP BY queue_id, sent_at
UNION ALL
SELECT queue_id, LEAST(sent_at, {_SOON}), LEAST(n, 1000000) FROM queue_sends
WHERE queue_id = ANY($2::bigint[]) AND sent_at > $1 AND n > 0
"""

EXPIRE_DUE = """
WITH due AS (
    SELECT id FROM actions WHERE state = 'pending' AND deadline <= now()
    ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE actions a SET state = 'expired', completed_at = now(),
    last_error = 'block expired at HubSpot before it could be sent'
FROM due WHERE a.id = due.id
RETURNING a.queue_id
"""

PRUNE_SENDS = "DELETE FROM queue_sends WHERE sent_at < $1"

# Claims no sender of this process holds (`$2`), older than `$1`, of the portals this instance
# owns (`$4`): see housekeeping.stale_claims.
# (A sequential pass: claimed rows have no index, which would cost an insert per claim.)
RELEASE_STALE_CLAIMS = """
WITH stale AS (
    SELECT id FROM actions
    WHERE state = 'claimed' AND (claimed_at IS NULL OR claimed_at < $1)
      AND NOT (id = ANY($2::bigint[])) AND portal_id = ANY($4::bigint[])
    LIMIT $3 FOR UPDATE SKIP LOCKED
), r AS (
    UPDATE actions a SET state = 'pending' FROM stale WHERE a.id = stale.id
    RETURNING a.queue_id
)
SELECT queue_id, count(*)::int AS n FROM r GROUP BY queue_id
"""

# Retention in small batches, so the table never takes a long lock.
DELETE_FINISHED = """
DELETE FROM actions WHERE id IN (
    SELECT id FROM actions
    WHERE (state = 'done' AND completed_at < $1)
       OR (state IN ('failed', 'expired') AND completed_at < $2)
    LIMIT $3
)
"""

# -- portals and tokens ---------------------------------------------------------------------

# (what a row edited by hand may hold is cut to size here: text, and at most 200 scopes)
_PORTAL_COLUMNS = f"""
portal_id, left(refresh_token, 8192) AS refresh_token, left(access_token, 8192) AS access_token,
{_readable("access_expires_at", nullable=True)} AS access_expires_at,
status, left(disconnected_reason, 300) AS disconnected_reason,
{_readable("disconnected_at", nullable=True)} AS disconnected_at,
(SELECT array_agg(left(s, 100)) FROM unnest(scopes[1:200]) AS s WHERE s IS NOT NULL) AS scopes,
left(hub_domain, 255) AS hub_domain,
{_readable("last_refresh_at", nullable=True)} AS last_refresh_at,
left(last_refresh_error, 300) AS last_refresh_error, {_readable("connected_at")} AS connected_at,
{_readable("updated_at")} AS updated_at
"""

GET_PORTAL = f"SELECT {_PORTAL_COLUMNS} FROM portals WHERE portal_id = $1"

# Held across the refresh request: one refresh per portal, whichever instance asks.
LOCK_PORTAL = GET_PORTAL + " FOR UPDATE"

LIST_PORTALS = f"SELECT {_PORTAL_COLUMNS} FROM portals ORDER BY portal_id"

# Portals that have actions but no portals row (never connected).
UNCONNECTED_PORTALS = """
SELECT DISTINCT q.portal_id FROM queues q
WHERE NOT EXISTS (SELECT 1 FROM portals p WHERE p.portal_id = q.portal_id)
ORDER BY q.portal_id
"""

HAS_ACTIONS = "SELECT EXISTS (SELECT 1 FROM queues WHERE portal_id = $1) AS known"

# A connection (the CLI's, with a refresh token only): replaces whatever was stored.
UPSERT_REFRESH_TOKEN = """
INSERT INTO portals (portal_id, refresh_token) VALUES ($1, $2)
ON CONFLICT (portal_id) DO UPDATE
SET refresh_token = EXCLUDED.refresh_token, access_token = NULL, access_expires_at = NULL,
    status = 'connected', disconnected_reason = NULL, disconnected_at = NULL,
    last_refresh_error = NULL, connected_at = now(), updated_at = now(),
    version = portals.version + 1
"""

# An install (or reinstall): every token and what HubSpot granted, in one statement.
CONNECT_PORTAL = """
INSERT INTO portals (portal_id, refresh_token, access_token, access_expires_at, scopes,
                     hub_domain, last_refresh_at)
VALUES ($1, $2, $3, $4, $5, $6, now())
ON CONFLICT (portal_id) DO UPDATE
SET refresh_token = EXCLUDED.refresh_token, access_token = EXCLUDED.access_token,
    access_expires_at = EXCLUDED.access_expires_at, scopes = EXCLUDED.scopes,
    hub_domain = EXCLUDED.hub_domain, status = 'connected', disconnected_reason = NULL,
    disconnected_at = NULL, last_refresh_at = now(), last_refresh_error = NULL,
    connected_at = now(), updated_at = now(), version = portals.version + 1
"""

SAVE_TOKENS = """
UPDATE portals SET refresh_token = $2, access_token = $3, access_expires_at = $4,
    last_refresh_at = now(), last_refresh_error = NULL, updated_at = now(),
    version = version + 1
WHERE portal_id = $1
"""

SET_PORTAL_DETAILS = """
UPDATE portals SET scopes = $2, hub_domain = COALESCE($3, hub_domain), updated_at = now()
WHERE portal_id = $1
"""

RECORD_REFRESH_ERROR = """
UPDATE portals SET last_refresh_error = $2, updated_at = now() WHERE portal_id = $1
"""

# Disconnected: the stored tokens are gone (revoked, or refused by HubSpot); actions wait.
DISCONNECT_PORTAL = """
INSERT INTO portals (portal_id, status, disconnected_reason, disconnected_at)
VALUES ($1, 'disconnected', $2, now())
ON CONFLICT (portal_id) DO UPDATE
SET refresh_token = NULL, access_token = NULL, access_expires_at = NULL,
    status = 'disconnected', disconnected_reason = EXCLUDED.disconnected_reason,
    disconnected_at = now(), updated_at = now(), version = portals.version + 1
"""

# Rows that wait for their portal's connection go again now (it is connected).
WAKE_PORTAL = """
UPDATE actions SET not_before = NULL
WHERE portal_id = $1 AND state = 'pending' AND not_before IS NOT NULL
  AND starts_with(last_error, $2)
RETURNING queue_id
"""

PORTAL_BACKLOG = """
SELECT portal_id,
       count(*) FILTER (WHERE state IN ('pending', 'claimed')) AS pending,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'expired') AS expired
FROM actions WHERE ($1::bigint IS NULL OR portal_id = $1)
  AND state IN ('pending', 'claimed', 'failed', 'expired')
GROUP BY portal_id
"""

# Re-encryption (keys rotate): batches in portal order.
PORTAL_CIPHERTEXTS = """
SELECT portal_id, refresh_token, access_token FROM portals
WHERE ($1::bigint IS NULL OR portal_id > $1)
  AND (refresh_token IS NOT NULL OR access_token IS NOT NULL)
ORDER BY portal_id LIMIT $2
FOR UPDATE
"""

REENCRYPT_PORTAL = """
UPDATE portals SET refresh_token = $2, access_token = $3, updated_at = now(),
    version = version + 1
WHERE portal_id = $1
"""

# -- OAuth install flow ----------------------------------------------------------------------

# States are added one at a time (a transaction-scoped lock), so the caps below hold exactly.
LOCK_OAUTH_STATES = "SELECT pg_advisory_xact_lock(7468300001)"

LIVE_OAUTH_STATES = """
SELECT count(*) AS live, count(*) FILTER (WHERE client = $1) AS mine
FROM oauth_states WHERE expires_at > $2
"""

INSERT_OAUTH_STATE = """
INSERT INTO oauth_states (state_sha256, redirect_uri, client, expires_at) VALUES ($1, $2, $3, $4)
"""

# Single use: taking a state deletes it, whether it is still live or not.
TAKE_OAUTH_STATE = f"""
DELETE FROM oauth_states WHERE state_sha256 = $1
RETURNING redirect_uri, {_readable("expires_at")} AS expires_at
"""

DELETE_EXPIRED_OAUTH_STATES = "DELETE FROM oauth_states WHERE expires_at <= $1"

# -- operations -----------------------------------------------------------------------------

PING = "SELECT 1"

# (a policy edited by hand may hold anything: only numbers count, at most 366 days)
# Queues with an operator override: its window may be longer than the stored policy's.
OVERRIDDEN_QUEUES = "SELECT policy, override FROM queues WHERE override IS NOT NULL"

LONGEST_PERIOD = """
SELECT max(LEAST((policy->>'period_s')::numeric, 31622400))::float8 AS longest FROM queues
WHERE jsonb_typeof(policy->'period_s') = 'number'
"""

PENDING_BY_QUEUE = f"""
SELECT queue_id, count(*)::int AS pending, {_readable("max(deadline)")} AS latest_deadline
FROM actions WHERE state = 'pending' GROUP BY queue_id
"""

ALL_ACTION_CONFIGS = "SELECT portal_id, action_id, policy FROM action_configs"

SET_ACTION_CONFIG = """
INSERT INTO action_configs (portal_id, action_id, policy) VALUES ($1, $2, $3)
ON CONFLICT (portal_id, action_id) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()
"""

# (a row edited by hand to hold JSON null is still there: answered as an empty object)
GET_ACTION_CONFIG = """
SELECT CASE WHEN jsonb_typeof(policy) = 'null' THEN '{}'::jsonb ELSE policy END AS policy
FROM action_configs
WHERE portal_id = $1 AND action_id = $2
"""

DELETE_ACTION_CONFIG = """
DELETE FROM action_configs WHERE portal_id = $1 AND action_id = $2 RETURNING 1
"""

LIST_ACTION_CONFIGS = """
SELECT portal_id, action_id, policy FROM action_configs
WHERE $1::bigint IS NULL OR (portal_id, action_id) > ($1, $2)
ORDER BY portal_id, action_id LIMIT $3
"""

# -- audit log ---------------------------------------------------------------------------------

ADD_AUDIT = """
INSERT INTO audit_log (actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5)
"""

# Newest first; the cursor is the last id seen.
LIST_AUDIT = f"""
SELECT id, {_readable("at")} AS at, left(actor, 100) AS actor, left(action, 100) AS action,
       left(target, 300) AS target, before, after
FROM audit_log
WHERE ($1::text IS NULL OR target = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3
"""

DELETE_OLD_AUDIT = """
DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_log WHERE at < $1 LIMIT $2)
"""

# One action, for operators (every timestamp and counter bounded on read).
GET_ACTION = f"""
SELECT a.id, a.callback_id, a.state, a.portal_id, a.queue_id, left(q.key, 300) AS queue_key,
       a.priority, {_count("a.attempts")} AS attempts, {_count("a.failures")} AS failures,
       left(a.last_error, 500) AS last_error, a.complete_as,
       {_readable("a.received_at")} AS received_at,
       {_readable("a.claimed_at", nullable=True)} AS claimed_at,
       {_readable("a.sent_at", nullable=True)} AS sent_at,
       {_readable("a.completed_at", nullable=True)} AS completed_at,
       {_readable("a.not_before", nullable=True)} AS not_before,
       {_readable("a.deadline")} AS deadline
FROM actions a LEFT JOIN queues q ON q.id = a.queue_id
WHERE a.callback_id = $1
"""
