"""Bad configuration: whatever a throttled.toml or the environment holds, the real loader
answers a Config or one ConfigError of one short line that names what is wrong (never
another exception, never a secret echoed), and the real `throttled` console script prints
that one line and exits 2, without a traceback.

The action endpoint's fuzzing (hypothesis, against a running daemon) is
tests/test_fuzz_action.py; the HTTP API's (schemathesis) is tests/test_openapi.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import typing
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from throttled import config as config_module
from throttled.config import ConfigError, Secret

THROTTLED = str(Path(sys.executable).with_name("throttled"))  # the console script
EXAMPLE = Path(__file__).resolve().parent.parent / "throttled.toml"
MAX_MESSAGE = 400  # characters: one line an operator reads, not a dump of the value
MARK = "S3CR3T"  # put in every secret value drawn: an error message must never show it
EXAMPLES = {"documents": 400, "mutations": 300, "environment": 300}
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples every run (a failure is reproducible in CI)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SECTIONS = config_module.sections()
KINDS: dict[tuple[str, str], Any] = {
    (section, name): kind
    for section, cls in SECTIONS.items()
    for name, kind in typing.get_type_hints(cls).items()
}
SECRET_KINDS = (Secret, tuple[Secret, ...])


# --- TOML text of any value ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Raw:
    """A TOML fragment written as it is (an invalid escape, a 5,000-digit integer...)."""

    text: str


def toml_key(key: str) -> str:
    """A bare key when it can be one, else a quoted one."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: Any, *, ascii_only: bool = True) -> str:
    """TOML text for a drawn value."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=ascii_only)  # (JSON escapes are TOML's)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v, ascii_only=ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        items = (
            f"{toml_key(k)} = {toml_value(v, ascii_only=ascii_only)}" for k, v in value.items()
        )
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r}")


def toml_document(doc: dict[str, Any], *, ascii_only: bool) -> str:
    """A document: top-level scalars first, then one table per section (admin.tokens as an
    array of tables when it is a list of tables)."""
    lines = [
        f"{toml_key(k)} = {toml_value(v, ascii_only=ascii_only)}"
        for k, v in doc.items()
        if not isinstance(v, dict)
    ]
    for section, values in doc.items():
        if not isinstance(values, dict):
            continue
        lines.append(f"[{toml_key(section)}]")
        tables: dict[str, list[dict[str, Any]]] = {}
        for key, value in values.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                tables[key] = value
            else:
                lines.append(f"{toml_key(key)} = {toml_value(value, ascii_only=ascii_only)}")
        for key, entries in tables.items():
            for entry in entries:
                lines.append(f"[[{toml_key(section)}.{toml_key(key)}]]")
                lines.extend(
                    f"{toml_key(k)} = {toml_value(v, ascii_only=ascii_only)}"
                    for k, v in entry.items()
                )
    return "\n".join(lines) + "\n"


# --- strategies ------------------------------------------------------------------------------

_TEXT = st.characters(blacklist_categories=("Cs",))
ODD = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\t",
    "\x1b[31m",
    "\x7f",
    "\u202e",
    "\u200b",
    "\ufeff",
    "\u2028",
    "\U0001f680",
    "e\u0301",
    "\u0661\u0662",
    "'; DROP TABLE actions; --",
    "%s%n",
    "{app_id}",
    "../../etc/passwd",
    "x" * 5000,
    "http://",
    "https://h:99999",
    "https://" + "a" * 64 + ".example",
    "postgresql://u:pw@[::1/x",
    "P99999999999999999999999W",
    "-1",
    "nan",
]
texts = st.one_of(st.text(_TEXT, max_size=40), st.sampled_from(ODD))
HUGE = [2**63, -(2**63) - 1, 10**40, -(10**40)]
numbers = st.one_of(
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(),  # inf and nan included
    st.sampled_from([0, -1, -0.0, 1e308, 5e-324, 0.5]),
)
when = st.one_of(
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.just(datetime(1979, 5, 27, 7, 32, tzinfo=timezone(timedelta(hours=-7)))),
)
scalars = st.one_of(texts, numbers, st.booleans(), when)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=2),
    max_leaves=5,
)
raw_fragments = st.sampled_from(
    [
        Raw('"\\ud800"'),  # a lone surrogate: not Unicode
        Raw('"\\u0000"'),
        Raw("9" * 5000),  # past Python's integer-string limit
        Raw("1e400"),  # TOML has no infinity this way: a float overflowing to inf
        Raw("0x7fffffffffffffffff"),
        Raw("[" * 3000 + "]" * 3000),  # deep nesting
        Raw("{ a = { b = { c = 1 } } }"),
        Raw("1979-05-27T25:61:00Z"),  # not a time
        Raw("'''\nmulti\nline'''"),
        Raw('"""\n\\\n  continued"""'),
        Raw("true\n[server]\nport = 1"),  # a section redefined below
    ]
)


def secret_values() -> st.SearchStrategy[Any]:
    """A text marked as secret, shaped to be refused as often as accepted."""
    bad = st.sampled_from(["", " ", "\x00", "\n", " x ", "://", "postgresql://u:@h:99999/", "*"])
    return st.builds(lambda a, b: f"{a}{MARK}{b}", bad | texts, bad | texts)


def value_for(kind: Any) -> st.SearchStrategy[Any]:
    """Any value for a key of this type: of its own type (odd) or of another type."""
    if kind in SECRET_KINDS:
        own = secret_values() if kind is Secret else st.lists(secret_values(), max_size=3)
    elif kind is int:
        own = st.one_of(st.integers(), st.sampled_from(HUGE))
    elif kind is float:
        own = numbers
    elif kind is bool:
        own = st.booleans()
    elif kind is str:
        own = texts
    else:  # admin.tokens: an array of tables
        own = st.lists(token_tables(), max_size=3)
    return st.one_of(own, own, values, raw_fragments)


def token_tables() -> st.SearchStrategy[dict[str, Any]]:
    entry = st.fixed_dictionaries(
        {},
        optional={
            "id": texts,
            "token": secret_values(),
            "token_sha256": st.sampled_from(["", "0" * 64, "G" * 64, "ab"]) | texts,
            "nope": values,
        },
    )
    return entry


@dataclasses.dataclass
class Change:
    """One thing set in the document, and what an error about it should name."""

    section: str
    key: str | None  # None: the section itself (unknown, or not a table)
    value: Any
    secret: bool = False


@st.composite
def changes(draw: st.DrawFn) -> Change:
    how = draw(st.sampled_from(["known"] * 6 + ["unknown_key", "unknown_section", "not_table"]))
    if how == "unknown_section":
        return Change(draw(texts.filter(lambda t: t not in SECTIONS)), None, {})
    section = draw(st.sampled_from(sorted(SECTIONS)))
    if how == "not_table":
        return Change(section, None, draw(scalars | st.lists(scalars, max_size=2)))
    if how == "unknown_key":
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        return Change(section, draw(texts.filter(lambda t: t not in known)), draw(values))
    key = draw(st.sampled_from(sorted(k for s, k in KINDS if s == section)))
    kind = KINDS[section, key]
    return Change(section, key, draw(value_for(kind)), secret=kind in SECRET_KINDS)


def build(items: list[Change]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for change in items:
        if change.key is None:
            doc[change.section] = change.value
        else:
            table = doc.setdefault(change.section, {})
            if isinstance(table, dict):
                table[change.key] = change.value
    return doc


# --- the checks ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A throttled.toml path in a directory of its own (hypothesis runs many examples in one
    test, so not pytest's per-test tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="throttled-bad-input-") as folder:
        yield Path(folder) / "throttled.toml"


def outcome(path: Path | None, environ: dict[str, str]) -> str | None:
    """None if the config loads; else the ConfigError's message, checked to be one clear
    line. Any other exception fails the test."""
    try:
        config_module.load(None if path is None else str(path), environ=environ)
    except ConfigError as exc:
        message = str(exc)
    else:
        event("loaded")
        return None
    shown = message.replace(str(path), "<file>") if path is not None else message
    event("refused: " + re.split(r"[:(]", shown, maxsplit=1)[0][:40])
    assert message.strip(), "an empty error message"
    assert not re.search(r"[\r\n]", message), f"not one line: {message!r}"
    assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:200]!r}..."
    assert "Traceback" not in message, message
    assert MARK not in message, f"a secret value is echoed: {message!r}"
    return message


def names(message: str, change: Change) -> bool:
    """Whether the message points at the change: its section (or the file, for text that is
    not TOML or not UTF-8)."""
    if "invalid TOML" in message or "not UTF-8" in message:
        return True
    if change.key is None and change.section not in SECTIONS:  # an unknown section's name
        return "unknown config section" in message
    return change.section in message


@settings(FUZZ, max_examples=EXAMPLES["documents"])
@given(items=st.lists(changes(), min_size=1, max_size=3), ascii_only=st.booleans())
def test_any_document_loads_or_is_one_clear_error_naming_its_section(items, ascii_only):
    text = toml_document(build(items), ascii_only=ascii_only)
    with scratch() as path:
        path.write_text(text, encoding="utf-8")
        message = outcome(path, {})
    if message is not None and len(items) == 1:
        assert names(message, items[0]), f"{message!r} does not name {items[0]}"


MUTATIONS = st.lists(
    st.tuples(
        st.floats(0, 1, exclude_max=True),
        st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[float, str, int]]) -> bytes:
    out = bytearray(data)
    for where, op, byte in ops:
        i = int(where * len(out)) if out else 0
        if op == "insert" or not out:
            out.insert(i, byte)
        elif op == "delete":
            del out[i]
        elif op == "flip":
            out[i] ^= byte or 1
        elif op == "truncate":
            del out[i:]
        else:  # repeat a slice: a key or section given twice
            out[i:i] = out[i : i + byte]
    return bytes(out)


@settings(FUZZ, max_examples=EXAMPLES["mutations"])
@given(ops=MUTATIONS)
def test_the_example_file_mutated_bytewise_loads_or_is_one_clear_error(ops):
    data = mutate(EXAMPLE.read_bytes(), ops)
    with scratch() as path:
        path.write_bytes(data)
        outcome(path, {})


ENV_NAMES = sorted(
    [f"THROTTLED_{s.upper()}_{k.upper()}" for s, k in KINDS if s != "admin" or k != "tokens"]
    + list(config_module.LEGACY_ENV)
    + [config_module.ADMIN_ENV, "THROTTLED_NOPE_X", "THROTTLED_SERVER_PROT"]
)
SECRET_VARIABLES = {
    f"THROTTLED_{s.upper()}_{k.upper()}" for (s, k), kind in KINDS.items() if kind in SECRET_KINDS
} | {"DATABASE_URL", "ENCRYPTION_KEY", "HUBSPOT_CLIENT_SECRET", config_module.ADMIN_ENV}


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    chosen = draw(st.lists(st.sampled_from(ENV_NAMES), min_size=1, max_size=3, unique=True))
    environ = {}
    for name in chosen:
        if name in SECRET_VARIABLES:
            environ[name] = draw(secret_values())
        else:
            environ[name] = draw(texts | st.sampled_from(["1_0", "１", "0x10", "inf", "1e999"]))
    return environ


@settings(FUZZ, max_examples=EXAMPLES["environment"])
@given(environ=environments())
def test_any_environment_loads_or_is_one_clear_error_naming_the_variable_or_key(environ):
    message = outcome(EXAMPLE, environ)  # (over the example file: every key set)
    if message is not None and len(environ) == 1:
        (name,) = environ
        target = config_module.LEGACY_ENV.get(name)
        expected = [name] + ([".".join(target)] if target else [])
        if name.startswith("THROTTLED_") and name != config_module.ADMIN_ENV:
            section = next((s for s in SECTIONS if name.lower()[10:].startswith(s + "_")), "")
            expected.append(section or name)
        assert any(e in message for e in expected), f"{message!r} names none of {expected}"


# --- the real `throttled` command, as a child process -----------------------------------------

KEY = "z1H9A8wYOgvRS2fDt8yFQ8j3acdTXjVS54NmR3lrXOA="  # (a valid key, only for these files)
VALID = f'[security]\nencryption_key = "{KEY}"\n[hubspot]\nclient_secret = "a-{MARK}-b"\n'
BAD_FILES: list[tuple[str, bytes, str]] = [
    ("invalid TOML", b"[server\nport = 1\n", "invalid TOML"),
    ("unknown key", VALID.encode() + b"[server]\nprot = 8080\n", "unknown config key server.prot"),
    ("wrong type", b'[server]\nport = "eighty"\n', "server.port: expected an integer"),
    ("not UTF-8", b'[hubspot]\nclient_id = "caf\xe9"\n', "not UTF-8"),
    ("deep nesting", b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "invalid TOML"),
    ("too large", b"# " + b"x" * (1 << 20) + b"\n", "larger than"),
    (
        "bad secret",
        f'[security]\nencryption_key = "{MARK}-not-a-key"\n'.encode(),
        "security.encryption_key",
    ),
]


def child_env() -> dict[str, str]:
    """This environment without anything that would set a config key in the child."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("THROTTLED_")
        and k not in config_module.LEGACY_ENV
        and k != "CREDENTIALS_DIRECTORY"
    }


async def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        THROTTLED,
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def check_one_error(run: tuple[int, str, str], expected: str, what: str) -> None:
    code, out, err = run
    assert code == 2, f"{what}: exit {code}; stderr {err[-2000:]!r}"
    assert "Traceback" not in out + err, f"{what}: a traceback:\n{err[-3000:]}"
    lines = err.splitlines()
    assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr: {err[-2000:]!r}"
    assert lines[0].startswith("throttled: "), f"{what}: {lines[0]!r}"
    assert expected in lines[0], f"{what}: {lines[0]!r} does not say {expected!r}"
    assert len(lines[0]) <= MAX_MESSAGE + len("throttled: "), f"{what}: {lines[0][:300]!r}..."
    assert MARK not in out + err, f"{what}: a secret value is printed"
    assert out == "", f"{what}: stdout {out[:300]!r}"


@pytest.mark.timeout(180)
async def test_the_throttled_command_prints_one_error_line_for_each_bad_file(tmp_path):
    assert Path(THROTTLED).exists(), THROTTLED
    runs: list[tuple[str, str, tuple[str, ...]]] = []
    for n, (what, data, expected) in enumerate(BAD_FILES):
        path = tmp_path / f"{n}.toml"
        path.write_bytes(data)
        command = ("check-config", "serve", "migrate")[n % 3]
        runs.append((f"{command}: {what}", expected, (command, "--config", str(path))))
    runs.append(("serve: a directory", "is a directory", ("serve", "--config", str(tmp_path))))
    missing = str(tmp_path / "missing.toml")
    runs.append(("serve: no such file", "not found", ("serve", "--config", missing)))
    gate = asyncio.Semaphore(2)  # (two cores: more at once would only queue)

    async def one(args: tuple[str, ...]) -> tuple[int, str, str]:
        async with gate:
            return await run_cli(*args, cwd=tmp_path)

    results = await asyncio.gather(*(one(args) for _, _, args in runs))
    for (what, expected, _), result in zip(runs, results, strict=True):
        check_one_error(result, expected, what)


@pytest.mark.timeout(120)
async def test_serve_with_values_that_parse_but_cannot_work_is_one_error_line(db_url, tmp_path):
    """Values only the start-up finds wrong (the config itself is valid)."""
    elsewhere = db_url.rsplit("/", 1)[0] + "/no_such_database_here"
    cases = [
        (
            "a listen address that is no address",
            f'[database]\nurl = "{db_url}"\n[server]\nhost = "256.256.256.256"\n',
            "256.256.256.256",
        ),
        (
            "a database that does not exist",
            f'[database]\nurl = "{elsewhere}"\n[server]\nport = 0\n',
            "no_such_database_here",
        ),
    ]
    for n, (what, text, expected) in enumerate(cases):
        path = tmp_path / f"serve-{n}.toml"
        path.write_text(VALID + text, encoding="utf-8")
        run = await run_cli("serve", "--config", str(path), cwd=tmp_path)
        check_one_error(run, expected, f"serve: {what}")
