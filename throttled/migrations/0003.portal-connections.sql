-- Portals connected by the OAuth install flow: their state, what HubSpot granted, and the
-- single-use `state` values of install flows under way.
-- depends: 0002.drop-claimed-index

ALTER TABLE portals
    ADD COLUMN status text NOT NULL DEFAULT 'connected'
        CHECK (status IN ('connected', 'disconnected')),
    ADD COLUMN disconnected_reason text,       -- why, when status = 'disconnected'
    ADD COLUMN disconnected_at timestamptz,
    ADD COLUMN scopes text[],                  -- granted, from the token or token-info
    ADD COLUMN hub_domain text,
    ADD COLUMN last_refresh_at timestamptz,    -- last successful token refresh
    ADD COLUMN last_refresh_error text,        -- last failed one (cleared by a success)
    ADD COLUMN version bigint NOT NULL DEFAULT 0;  -- bumped by every token write

-- Only a hash of each state is kept: a copy of the table cannot complete anyone's install.
-- `client` is a hash of the address that asked (IPv6 by /64): live states are capped per
-- client as well as in all, so that nobody can use up every install alone.
CREATE TABLE oauth_states (
    state_sha256  bytea PRIMARY KEY,
    redirect_uri  text NOT NULL,
    client        bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX oauth_states_expires ON oauth_states (expires_at);
CREATE INDEX oauth_states_client ON oauth_states (client, expires_at);
