"""What the benchmarks share: a scratch database, child processes that always stop, figures.

Not a test helper: it starts real processes (`throttled serve`, fake servers, load
generators) on loopback and makes sure every one of them, and the scratch database, is gone
when the benchmark ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import psycopg

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
VENV_BIN = REPO / ".venv" / "bin"
THROTTLED = VENV_BIN / "throttled"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DEFAULT_PG = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Variables the daemon would read as config overrides; the benchmark's config file must rule.
_CONFIG_ENV = (
    "DATABASE_URL",
    "ENCRYPTION_KEY",
    "HUBSPOT_CLIENT_ID",
    "HUBSPOT_CLIENT_SECRET",
    "HUBSPOT_REDIRECT_URI",
    "BASE_URL",
    "PORT",
)


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived: unwind through the cleanup code."""


def on_signals_unwind() -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into an exception, so the cleanup code runs.

    SIGINT is set explicitly: a shell starts background jobs with it ignored."""

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything the daemon would take as config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _CONFIG_ENV and not k.startswith("THROTTLED_")
    }
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


class ScratchDatabase:
    """A database created for one run and dropped (WITH FORCE) at the end."""

    def __init__(self, server_url: str, name: str) -> None:
        self.server_url = server_url
        self.name = name
        self.url = with_database(server_url, name)
        self.created = False

    def create(self) -> None:
        """CREATE DATABASE (dropping a leftover of the same name first)."""
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True

    def drop(self) -> None:
        """DROP DATABASE … WITH (FORCE); quiet if it is already gone."""
        if not self.created:
            return
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        """A psycopg connection to the scratch database."""
        return psycopg.connect(self.url, **kw)


class Children:
    """Child processes, each in its own session, stopped by pid in reverse start order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[TextIO] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: Path | None = None,
        stderr: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv; its output goes to the given files (or /dev/null)."""
        out = self._open(stdout)
        err = self._open(stderr)
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop them in order
        )
        self.procs.append((name, proc))
        return proc

    def _open(self, path: Path | None) -> Any:
        if path is None:
            return subprocess.DEVNULL
        f = path.open("a")
        self._files.append(f)
        return f

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every child still running, newest first; close their log files."""
        for _, proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()


def toml_value(value: Any) -> str:
    """A TOML literal for the simple values the benchmark configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string of printable text is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a throttled.toml with the given sections."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)


def run_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 120.0) -> str:
    """Run a `throttled` subcommand to completion; raise with its output if it fails."""
    done = subprocess.run(
        [str(THROTTLED), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"throttled {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path | None) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was up\n{tail}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1.0) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def http_get(url: str, timeout: float = 5.0) -> str:
    """GET url and return its text."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str) -> float | None:
    """A sample's value in Prometheus text (labels included in `name` if any)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat, in seconds (None if gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process (VmRSS in /proc/<pid>/status), KiB; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of a sequence (sorted here); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def log_events(path: Path) -> Counter[tuple[str, str]]:
    """(level, event) counts of a JSON-lines daemon log; non-JSON lines count as 'raw'."""
    counts: Counter[tuple[str, str]] = Counter()
    if not path.exists():
        return counts
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            counts[(str(entry.get("level", "?")), str(entry.get("event", "?")))] += 1
        except (ValueError, AttributeError):
            counts[("raw", line[:120])] += 1
    return counts


def print_log_events(path: Path, title: str) -> int:
    """Print the daemon log's events by level; return how many are warning or worse."""
    counts = log_events(path)
    bad = sum(n for (level, _), n in counts.items() if level not in ("info", "debug", "raw"))
    raw = sum(n for (level, _), n in counts.items() if level == "raw")
    if raw:
        print(f"!! {raw} line(s) of the daemon's stderr are not JSON although logging.format=json")
    if not counts:
        print(f"{title}: empty")
        return 0
    print(f"{title}: {sum(counts.values())} line(s), {bad} warning or worse")
    for (level, event), n in counts.most_common(15):
        print(f"    {n:>8}  {level:<8} {event}")
    return bad


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds text."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


@contextlib.contextmanager
def phase(title: str) -> Iterator[None]:
    """Print a phase title and how long it took."""
    print(f"-- {title}", flush=True)
    started = time.monotonic()
    yield
    print(f"   ({time.monotonic() - started:.1f} s)", flush=True)


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds of named processes, the database's backends and the whole machine."""

    def __init__(self, server_url: str, database: str) -> None:
        self._conn = psycopg.connect(server_url, autocommit=True)
        self._database = database

    def backend_pids(self) -> list[int]:
        """PostgreSQL backends connected to the scratch database."""
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self._database,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def snapshot(self, pids: Mapping[str, int]) -> dict[str, Any]:
        """Current counters: named pids, per-backend CPU, machine busy, wall time."""
        return {
            "wall": time.monotonic(),
            "procs": {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()},
            "backends": {pid: cpu_seconds(pid) or 0.0 for pid in self.backend_pids()},
            "machine": machine_busy_seconds(),
        }

    @staticmethod
    def delta(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float]:
        """CPU seconds used between two snapshots, by name; 'postgres' sums the backends."""
        out = {name: b["procs"][name] - a["procs"].get(name, 0.0) for name in b["procs"]}
        out["postgres"] = sum(v - a["backends"].get(pid, 0.0) for pid, v in b["backends"].items())
        out["machine"] = b["machine"] - a["machine"]
        out["wall"] = b["wall"] - a["wall"]
        return out

    def close(self) -> None:
        """Close the monitoring connection."""
        self._conn.close()


def cpu_text(d: Mapping[str, float], names: Sequence[str]) -> str:
    """'daemon 0.93, postgres 0.41, … cores' over the interval, plus the rest of the machine."""
    wall = d["wall"] or 1.0
    known = sum(d.get(n, 0.0) for n in names)
    parts = [f"{n} {d.get(n, 0.0) / wall:.2f}" for n in names]
    parts.append(f"other {(d['machine'] - known) / wall:.2f}")
    return (
        ", ".join(parts) + f" (cores busy, machine {d['machine'] / wall:.2f} of {os.cpu_count()})"
    )


def serve_argv(config: Path, profile: Path | None = None) -> list[str]:
    """`throttled serve`, optionally under cProfile (which slows it down: diagnosis only)."""
    serve = [str(THROTTLED), "serve", "--config", str(config)]
    if profile is None:
        return serve
    return [PYTHON, "-m", "cProfile", "-o", str(profile), *serve]


def print_profile(path: Path, top: int = 30) -> None:
    """The functions with the most own time in a cProfile dump."""
    import io
    import pstats

    if not path.exists():
        print(f"(no profile written at {path})")
        return
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    print("\n== daemon profile (cProfile, by own time; figures above are slowed by it) ==")
    text = out.getvalue()
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def config_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` items (value: TOML literal, else a string) as config sections."""
    import tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise SystemExit(f"--daemon-config wants section.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.setdefault(section, {})[key] = value
    return out


def merged(
    base: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """base with extra's keys set on top, section by section."""
    out = {section: dict(values) for section, values in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark takes (what Bench and run_main rely on)."""
    p.add_argument("--pg-url", default=DEFAULT_PG, help="PostgreSQL server URL")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--profile", action="store_true", help="run the daemon under cProfile (diagnosis only)"
    )
    p.add_argument(
        "--daemon-config",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra daemon config, e.g. ingest.linger_ms=2 (repeatable)",
    )


class Bench:
    """What every benchmark run owns: its arguments, child processes, a temp dir, a scratch
    database, the daemon's port, secret, config and log paths, and a CPU meter once started.
    Subclasses implement run(); cleanup() undoes everything, whatever state the run reached."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        self.children = Children()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"throttled-bench-{name}-"))
        self.db = ScratchDatabase(args.pg_url, f"throttled_bench_{os.getpid()}")
        self.secret = "bench-" + secrets.token_hex(16)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config = self.tmp / "throttled.toml"
        self.daemon_log = self.tmp / "daemon.log"
        self.profile = self.tmp / "daemon.prof" if args.profile else None
        self.meter: CpuMeter | None = None

    def run(self) -> str:
        """The whole benchmark; returns the summary line."""
        raise NotImplementedError

    def cleanup(self) -> None:
        """Stop children, drop the database, remove the temp dir (unless --keep)."""
        self.children.stop_all()
        if self.meter is not None:
            self.meter.close()
        try:
            self.db.drop()
        except Exception as exc:
            print(f"!! could not drop database {self.db.name}: {exc}", file=sys.stderr)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_main(name: str, bench: Bench) -> int:
    """Run a benchmark, always clean up, and print its one-line SUMMARY last."""
    on_signals_unwind()
    summary, code = f"SUMMARY {name}: FAILED", 1
    try:
        summary, code = bench.run(), 0
    except (KeyboardInterrupt, Interrupted) as exc:
        summary = f"SUMMARY {name}: INTERRUPTED ({type(exc).__name__} {exc})"
        code = 130
    except Exception as exc:
        import traceback

        traceback.print_exc()
        summary = f"SUMMARY {name}: FAILED ({type(exc).__name__}: {str(exc)[:200]})"
        if bench.daemon_log.exists():
            print("daemon log tail:\n" + bench.daemon_log.read_text(errors="replace")[-3000:])
    finally:
        bench.cleanup()
    print(summary.replace("\n", " "), flush=True)
    return code
