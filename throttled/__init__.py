"""throttled: a rate-limiting buffer for HubSpot custom workflow actions."""
