"""The embedded PostgreSQL: a command run beside a daemon leaves the daemon's server running."""

from __future__ import annotations

import psycopg

from throttled.db.embedded import embedded_database, running, start_blocking, stop_blocking


async def test_a_server_already_running_is_reused_and_left_running(tmp_path):
    data_dir = str(tmp_path / "var")
    server, url = start_blocking(data_dir)  # the daemon's
    try:
        assert running(data_dir)
        async with embedded_database(data_dir) as reused:  # a CLI command's
            with psycopg.connect(reused) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert running(data_dir)
        with psycopg.connect(url, connect_timeout=5) as conn:  # still up for the daemon
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop_blocking(server)
    assert not running(data_dir)


async def test_a_server_it_started_itself_is_stopped_after(tmp_path):
    data_dir = str(tmp_path / "var")
    async with embedded_database(data_dir) as url:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert running(data_dir)
    assert not running(data_dir)
