"""Hypothesis strategies for tests/test_fuzz_action.py: HubSpot custom-action requests, each
field valid or hostile, and raw mutated requests (bodies, headers, signatures, methods).

Every drawn value carries a *verdict*, what the daemon may answer because of it:

* ``VALID``: a value HubSpot could send that throttled must accept (with every other field
  valid, the answer must be 200 BLOCK). Input fields count as valid whatever their text or
  number: invalid rate values fall through to the next rate source, they never reject.
* ``EITHER``: debatable (a digit string as an id, a 5,000-character object type, a nested
  input value...): 200 or a 4xx, never a 5xx.
* ``INVALID``: the request must be rejected with a 4xx (a missing portalId, a bad signature).

A case's verdict is the worst of its values'. Strategies only draw descriptions; bodies that
need a fresh callbackId (``Unique``) are built by the test when it sends them.
"""

from __future__ import annotations

import json
import math
import random
import string
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

VALID, EITHER, INVALID = 0, 1, 2
VERDICT_NAMES = ("VALID", "EITHER", "INVALID")

RATE_KEYS = (
    "maxThroughput",
    "maxThroughPut",
    "timePeriod",
    "time",
    "timeUnit",
    "period",
    "pacing",
    "releaseDays",
    "releaseHours",
    "timezone",
    "startAt",
)
# The input fields throttled keeps with a row (a long text among them may be refused).
STORED_KEYS = frozenset((*RATE_KEYS, "priority", "queueName"))
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Missing:
    """A key left out of its object."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is (a lone-surrogate escape, a 400-digit number...)."""

    text: str
    label: str = ""

    def __repr__(self) -> str:
        if self.label:
            return f"Raw({self.label})"
        return f"Raw({self.text!r})"


@dataclass(frozen=True)
class Long:
    """``unit * count``: a long string that prints short in a falsifying example."""

    unit: str
    count: int

    @property
    def text(self) -> str:
        return self.unit * self.count

    def __repr__(self) -> str:
        return f"Long({self.unit!r}*{self.count})"


@dataclass(frozen=True)
class Noise:
    """``count`` pseudo-random characters (seeded): a long text that does not compress, so
    it cannot hide in PostgreSQL's compression of a long index key."""

    count: int
    seed: int = 0

    @property
    def text(self) -> str:
        rng = random.Random(self.seed)
        return "".join(rng.choice(_NOISE_ALPHABET) for _ in range(self.count))

    def __repr__(self) -> str:
        return f"Noise({self.count}, seed={self.seed})"


_NOISE_ALPHABET = string.ascii_letters + string.digits + "-_.:/ \u00e9\u6f22"


@dataclass(frozen=True)
class Unique:
    """A callbackId: ``prefix`` + a number unique within the test run (set when sent)."""

    prefix: str

    def __repr__(self) -> str:
        return f"Unique({self.prefix!r})"


def raw_repeat(unit: str, count: int, prefix: str = "", suffix: str = "") -> Raw:
    """A Raw fragment ``prefix + unit*count + suffix`` with a short label."""
    label = f"{prefix!r}+{unit!r}*{count}+{suffix!r}" if prefix or suffix else f"{unit!r}*{count}"
    return Raw(prefix + unit * count + suffix, label)


# --- JSON text ------------------------------------------------------------------------------


def expand(value: Any) -> Any:
    """A plain Python value (Long expanded) where that is possible; Raw stays Raw."""
    if isinstance(value, Long | Noise):
        return value.text
    return value


def encode(
    value: Any, *, ascii_only: bool = True, spaced: bool = False, unique: Callable[[str], str]
) -> str:
    """JSON text for a drawn value (MISSING keys are already left out of dicts)."""
    colon, comma = (": ", ", ") if spaced else (":", ",")

    def enc(v: Any) -> str:
        if isinstance(v, Raw):
            return v.text
        if isinstance(v, Long | Noise):
            return json.dumps(v.text, ensure_ascii=ascii_only)
        if isinstance(v, Unique):
            return json.dumps(unique(v.prefix), ensure_ascii=ascii_only)
        if isinstance(v, dict):
            items = (
                json.dumps(expand(k), ensure_ascii=ascii_only) + colon + enc(item)
                for k, item in v.items()
            )
            return "{" + comma.join(items) + "}"
        if isinstance(v, list | tuple):
            return "[" + comma.join(enc(item) for item in v) + "]"
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("non-finite floats are drawn as Raw tokens")
        return json.dumps(v, ensure_ascii=ascii_only)

    return enc(value)


def has_raw(value: Any) -> bool:
    """Whether a drawn tree holds a Raw fragment (which may make the whole body invalid)."""
    if isinstance(value, Raw):
        return True
    if isinstance(value, dict):
        return any(has_raw(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_raw(v) for v in value)
    return False


# --- building blocks ------------------------------------------------------------------------

_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
short_text = st.text(_TEXT, max_size=30)
# characters that have broken parsers, renderers and databases
ODD_TEXT = (
    "\u202e",  # right-to-left override
    "\u200f",  # right-to-left mark
    "\u200b",  # zero-width space
    "\ufeff",  # byte order mark
    "\u2028",  # line separator
    "e\u0301",  # combining acute accent
    "\U0001f680",  # rocket
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",  # family (ZWJ sequence)
    "\x01",
    "\x7f",
    "\n",
    "\\",
    '"',
    "'; DROP TABLE actions; --",
    "%s%n%x",
    "{{7*7}}",
    "\u0661\u0662",  # Arabic-Indic digits
)
odd_text = st.sampled_from(ODD_TEXT) | st.lists(st.sampled_from(ODD_TEXT), max_size=4).map("".join)
LONG_UNITS = ("a", "9", " ", "\u00e9", "\U0001f680", "\u202e", "ab", "MON,")
long_strings = st.builds(Long, st.sampled_from(LONG_UNITS), st.integers(256, 5000)) | st.builds(
    Noise, st.integers(256, 5000), st.integers(0, 3)
)
# lone surrogates and other escapes only raw JSON can hold
surrogate_strings = st.sampled_from(
    [
        Raw('"\\ud800"'),
        Raw('"\\udfff"'),
        Raw('"ap-\\ud83d-1"'),
        Raw('"\\ude80\\ud83d"'),
        Raw('"\\ud83d\\ude80"'),  # a valid pair (an emoji)
        Raw('"\\u0000"'),
        Raw('"x\\u0000y"'),
    ]
)
nested = st.sampled_from([[], {}, [1], [[[]]], {"a": 1}, {"a": {"b": [None]}}, ["x", 2]])
wrong_types = st.sampled_from([True, False, [], {}, [1], {"a": 1}, "abc", 1.5])
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | short_text
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=6,
)


def _v(strategy: st.SearchStrategy[Any], verdict: int) -> st.SearchStrategy[tuple[Any, int]]:
    return strategy.map(lambda value: (value, verdict))


def _sample(values: list[Any], verdict: int) -> st.SearchStrategy[tuple[Any, int]]:
    return _v(st.sampled_from(values), verdict)


# --- ids ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """The valid and the hostile (EITHER or INVALID) values of one field, as
    (value, verdict) strategies."""

    valid: st.SearchStrategy[tuple[Any, int]]
    hostile: st.SearchStrategy[tuple[Any, int]]


def id_values(*, positive: bool = True, required: bool = True) -> Pair:
    """(value, verdict) for an integer id (portalId, actionDefinitionId, workflowId, index).
    Hostile values come from one flat table, so each shows up often."""
    lo = 1 if positive else 0
    below = INVALID if positive else EITHER  # zero/negative: invalid for a positive id
    valid = st.one_of(
        _v(st.integers(lo, INT64_MAX), VALID),
        _sample([lo, 1, 62515, 2**31 - 1, 2**31, 2**53 + 1, INT64_MAX], VALID),
    )
    table: list[tuple[Any, int]] = [
        *((v, EITHER) for v in ["62515", " 5 ", "5\n", "05", "+5", "5_000", "5.0", "1e3"]),
        *((v, EITHER) for v in ["\u0661\u0662", "\u0663", "\U0001d7d3", "\u00a05"]),
        *((v, EITHER) for v in [5.0, 1e3, 1.0]),  # integral floats
        *((v, INVALID) for v in ["\u00b2", "--5", "0x10", "", "  ", "abc", "5-", "- 5", "1 2"]),
        *((v, INVALID) for v in [True, False, [], {}, [1], {"a": 1}]),
        *((v, INVALID) for v in [2**63, 2**64 - 1, 2**64, 2**100, -(2**63) - 1, -(2**64)]),
        *((v, INVALID) for v in [0.5, 1e308, -1e308, 5e-324, 1e19, -1e19]),
        (Long("9", 5000), INVALID),
        (Long("1", 20), INVALID),
        (Raw('"-' + "9" * 5000 + '"', "'-'+'9'*5000"), INVALID),
        (Raw('"\u00b2"', "'\\u00b2' escaped"), INVALID),
        (Raw("9" * 400, "9*400 (a number past double range)"), INVALID),
        (Raw("1" + "0" * 30, "1e30 as an integer literal"), INVALID),
        (Raw("1E400"), INVALID),
        *((v, below) for v in [0, -1, "0", "-1", "-0", "-5", -0.0, INT64_MIN, -(2**31)]),
    ]
    if required:
        table += [(MISSING, INVALID), (None, INVALID)]
    else:  # an optional id left out is fine; null for it is debatable
        valid = valid | _sample([MISSING], VALID)
        table.append((None, EITHER))
    hostile = st.one_of(
        st.sampled_from(table),
        st.sampled_from(table),
        st.sampled_from(table),
        _v(st.integers(lo, INT64_MAX).map(str), EITHER),  # "123"
        _v(st.integers(INT64_MIN, -1), below),
        _v(short_text.filter(lambda t: not t.strip().lstrip("+-").isdigit()), INVALID),
    )
    return Pair(valid, hostile)


# --- strings --------------------------------------------------------------------------------

# ("ap-62515-..." belongs to portal 62515 at the fake HubSpot: another portal's completion
# of it is rejected, which exercises the sender's rejection path)
CALLBACK_PREFIXES = ["ap-62515-987654321-", "ap-n-", "cb-", "\u202eap-", "\U0001f680-", "e\u0301-"]


def callback_ids() -> Pair:
    """(value, verdict) for callbackId: unique valid ids, and hostile ones."""
    valid = st.one_of(
        _v(st.sampled_from(CALLBACK_PREFIXES).map(Unique), VALID),
        _v(st.builds(lambda t: Unique(t + "-"), short_text | odd_text), VALID),
    )
    either = st.one_of(
        _v(long_strings, EITHER),
        _v(surrogate_strings, EITHER),
        _sample(["\x01", "\u00a0", "\u3000", "a\nb", "\u2028"], EITHER),
    )
    invalid = st.one_of(
        _sample([MISSING, None, "", " ", "\t\n ", "a\x00b", "\x00"], INVALID),
        _sample([17, 0, -1, 1.5, 1e308, True, False, [], {}, ["ap-1"], {"id": "x"}], INVALID),
    )
    return Pair(valid, either | invalid)


def object_strings(*, allow_int: bool) -> Pair:
    """(value, verdict) for object.objectType / object.objectId (optional, informational)."""
    valid = st.one_of(
        _sample([MISSING, None, "CONTACT", "DEAL", "0-1", "2-123456"], VALID),
        _v(st.text(_TEXT, min_size=1, max_size=100), VALID),
        _v(odd_text.filter(bool), VALID),
    )
    if allow_int:
        valid = valid | _v(st.integers(INT64_MIN, INT64_MAX), VALID)
    either = st.one_of(
        _v(long_strings, EITHER),
        _v(surrogate_strings, EITHER),
        _v(wrong_types, EITHER),
        _sample(["", "a\x00b", 2**64, 2**100, 1e308, -0.0, Long("9", 5000)], EITHER),
    )
    if not allow_int:
        either = either | _sample([5, 0, -1], EITHER)
    return Pair(valid, either)


# --- input fields ---------------------------------------------------------------------------

NUMBERS_HOSTILE = [
    0,
    -1,
    -0.0,
    1.5,
    1e308,
    -1e308,
    5e-324,
    2**63 - 1,
    2**63,
    2**64,
    2**70,
    True,
    False,
    None,
    "",
    " ",
    "\u00b2",
    "\u0661\u0662",
    "--5",
    " 5 ",
    "5_000",
    "0x10",
    "+5",
    "1e308",
    "1e-320",
    "inf",
    "-inf",
    "Infinity",
    "NaN",
    "nan",
    "1.5",
    "2.0",
    "-0",
    Long("9", 5000),
    Long("9", 40),
    Long("9", 41),
    Raw("1" + "0" * 400, "1e400 as an integer literal"),
    Raw("1E400"),
]
LIMITS = ["1", "10", "1000000", "1000001", 1, 5, 1000000, 1000001, "  7 ", 10.0]
COUNTS = ["1", "0.5", "0.001", "366", "367", "31622400", 1, 0.5, 1e-300, 366, 367, 8784]
UNITS = [
    "seconds",
    "minutes",
    "hours",
    "days",
    "second",
    "minute",
    "hour",
    "day",
    "Seconds",
    "DAYS",
    " hours ",
    "weeks",
    "ms",
    "secondss",
    "s",
    "",
]
PACINGS = ["window", "even", "EVEN", " even ", "burst", "Window", ""]
DAYS = [
    "MON",
    "MON,TUE,WED,THU,FRI",
    "mon-fri",
    "Mon-Sun",
    "SUN",
    "SAT,SUN",
    "SUN,SUN",
    "FRI-MON",
    "Sun-Sat",
    "Monday;Friday",
    "monday , tuesday",
    "tues",
    "MON –  FRI",
    ",",
    ",,MON",
    "MON-",
    "-",
    "XYZ",
    "1,2,3",
    "Mo",
    "",
    Long("MON,", 1250),
    Long("MON-", 1250),
]
HOURS = [
    "09:00-17:00",
    "24:00-24:00",
    "23:59:59-00:00",
    "00:00-00:00",
    "00:00-24:00",
    "22:00-06:00",
    "12:00-12:00",
    "23:59:59-23:59:59",
    "00:00:00-00:00:01",
    "02:30-03:30",
    "01:30-01:45",
    "9-17",
    "9:00-17:00",
    "25:00-26:00",
    "09:60-10:00",
    "99:99-99:99",
    "09:00\u201317:00",  # en dash
    "09:00:60-10:00",
    "-",
    "",
    "09:00-17:00,18:00-19:00",
    "\u0660\u0669:00-17:00",  # Arabic-Indic digits
    Long("09:00-17:00,", 400),
]
ZONES = [
    "Etc/GMT+14",
    "Etc/GMT-14",
    "Etc/GMT+12",
    "Pacific/Kiritimati",
    "Pacific/Apia",
    "Pacific/Chatham",
    "America/New_York",
    "America/Santiago",
    "America/St_Johns",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Antarctica/Troll",
    "Africa/Casablanca",
    "Europe/Dublin",
    "UTC",
    "utc",
    "Z",
    "GMT",
    "EST5EDT",
    "Factory",
    "localtime",
    "posixrules",
    "right/UTC",
    "../../etc/passwd",
    "/etc/passwd",
    "/etc/localtime",
    "America/../Europe/Paris",
    "..",
    ".",
    "",
    " America/New_York ",
    "America/New_York\x00",
    "Europe/London/",
    "+05:00",
    "\u202eUTC",
    Long("A", 5000),
    Long("../", 100),
]
START_AT = [
    "9999-12-31T00:00:00Z",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:00:00-14:00",
    "9999-12-31T23:00",
    "9999-12-31T23:59:59.999999+00:00",
    "9999-12-31T23:59:59-00:01",
    "9999-12-01T00:00:00Z",
    "9999-11-30T23:59:59Z",
    "9999-12-31",
    "0001-01-01T00:00:00Z",
    "0001-01-01",
    "0001-01-01T00:00",
    "1969-12-31T23:59:59Z",
    "1970-01-01T00:00:00Z",
    "2030-01-01T00:00:00Z",
    "2000-01-01T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "2024-02-29T24:00:00Z",
    "2025-03-09T02:30:00",  # a DST gap in America/New_York
    "2025-11-02T01:30:00",  # a repeated wall time in America/New_York
    "2011-12-30T12:00:00",  # a day Pacific/Apia skipped
    "2027-03-14T02:30:00",  # the next spring-forward gap in America/New_York
    "2027-03-28T01:30:00",  # ... and in Europe/London
    "2025-01-01T00:00:00+25:00",
    "2025-01-01T00:00:00.1234567Z",
    "20250101T000000Z",
    "2025-W01-1",
    "2025-001",
    "now",
    "T",
    "",
    " 2030-01-01T00:00:00Z ",
    0,
    -1,
    1e308,
    253402300799,
    Long("9", 5000),
]
# the edge values the fuzz test was asked to cover, drawn more often than the rest
BRIEF_EDGES: Mapping[str, list[Any]] = {
    "startAt": [
        "9999-12-31T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:00:00-14:00",
        "9999-12-31T23:00",
    ],
    "releaseDays": ["MON", "MON,TUE,WED,THU,FRI"],
    "releaseHours": ["09:00-17:00", "24:00-24:00", "23:59:59-00:00"],
    "timezone": [
        "Etc/GMT+14",
        "Pacific/Kiritimati",
        "America/New_York",
        Long("A", 5000),
        "../../etc/passwd",
    ],
    "maxThroughput": [True, 1, 1.0, "1", 1e308, 2**64],
    "queueName": [Noise(3000), Long("q", 3000), Noise(256), Long("q", 256), "shared"],
}
ALL_ZONE_NAMES = sorted(zoneinfo.available_timezones())

datetimes_iso = st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
VALUES_BY_KEY: Mapping[str, list[Any]] = {
    "maxThroughput": LIMITS,
    "maxThroughPut": LIMITS,
    "timePeriod": COUNTS,
    "time": COUNTS,
    "timeUnit": UNITS,
    "period": UNITS,
    "pacing": PACINGS,
    "releaseDays": DAYS,
    "releaseHours": HOURS,
    "timezone": ZONES,
    "startAt": START_AT,
    "priority": ["3", 3, -5, "-5", "+5", " 7 ", Long("9", 18), Long("9", 19), 2**31, 10**7],
    "queueName": [
        "shared",
        "  ",
        "",
        "q/1",
        "queue:1:named:x",
        "a b",
        "\u202eeman",
        Long("q", 255),
        Long("q", 256),
        Long("q", 3000),
        Noise(3000),
        Noise(2700, seed=1),
        Long("\U0001f680", 300),
        5,
        0,
        -1,
        2**63,
        "shared\x00",
    ],
}
_KEY_EXTRAS: Mapping[str, st.SearchStrategy[Any]] = {
    "timezone": st.sampled_from(ALL_ZONE_NAMES),
    "startAt": datetimes_iso,
    "releaseHours": st.tuples(st.times(), st.times()).map(
        lambda t: f"{t[0].isoformat('seconds')}-{t[1].isoformat('minutes')}"
    ),
}


def input_value(key: str) -> st.SearchStrategy[Any]:
    """A value for one input field: its own edge values, hostile numbers, text, junk."""
    own = st.sampled_from(list(VALUES_BY_KEY.get(key, ["x"])))
    numbers = st.sampled_from(NUMBERS_HOSTILE)
    branches = [own, own, own, own, own, numbers, numbers, short_text, odd_text]
    branches += [long_strings, surrogate_strings, nested, json_values]
    if key in BRIEF_EDGES:
        branches += [st.sampled_from(BRIEF_EDGES[key])] * 3
    if key in _KEY_EXTRAS:
        branches.append(_KEY_EXTRAS[key])
    return st.one_of(*branches)


def input_value_verdict(key: Any, value: Any) -> int:
    """What the daemon may answer because of one input field (key and value)."""
    verdict = VALID
    key_text = expand(key)
    if not isinstance(key_text, str) or "\x00" in key_text:
        verdict = EITHER
    value = expand(value)
    if value is None or isinstance(value, Unique):
        return verdict
    if isinstance(value, bool | Raw | list | tuple | dict):
        return EITHER
    if isinstance(value, int):
        return verdict if INT64_MIN <= value < 2**64 else EITHER
    if isinstance(value, float):
        return verdict
    if isinstance(value, str):
        if "\x00" in value:
            return EITHER
        if key_text in STORED_KEYS and len(value) > 255:
            return EITHER  # a stored text is bounded: may be refused
        if key_text == "queueName" and len(value.strip()) > 100:
            return EITHER
        return verdict
    return EITHER


_rate_dict = st.fixed_dictionaries(
    {}, optional={key: input_value(key) for key in (*RATE_KEYS, "priority", "queueName")}
)
_other_keys = st.one_of(
    short_text,
    st.sampled_from(["fields", "queue", "email", "__proto__", "constructor", "", " "]),
    st.builds(Long, st.sampled_from(["k", "\U0001f680"]), st.integers(256, 5000)),
    st.sampled_from(["a\x00b", "maxThroughput ", "MAXTHROUGHPUT", "max_throughput"]),
)
_other_fields = st.dictionaries(_other_keys, json_values | long_strings | odd_text, max_size=4)


@st.composite
def _coherent_rate_fields(draw: Any) -> dict[str, Any]:
    """A usable rate with a schedule of edge values: these reach the stored policy, so the
    scheduler has to evaluate them."""
    fields: dict[str, Any] = {
        # (1, True and 1.0 compare equal: a twin swaps them, see test_fuzz_action)
        "maxThroughput": draw(st.sampled_from(["1", "5", "100", 1, True, 1.0, 2, "1000000"])),
        "timeUnit": draw(st.sampled_from(["seconds", "minutes", "hours", "days"])),
    }
    if draw(st.booleans()):
        fields["timePeriod"] = draw(
            st.sampled_from(["1", "2", "0.5", 30, "366", "0.001", "0.0009", 1e-300, 5e-324, 8784])
        )
    optional = {
        "pacing": st.sampled_from(["window", "even"]),
        "releaseDays": st.sampled_from(BRIEF_EDGES["releaseDays"]) | st.sampled_from(DAYS),
        "releaseHours": st.one_of(
            st.sampled_from(BRIEF_EDGES["releaseHours"]),
            st.sampled_from(HOURS),
            _KEY_EXTRAS["releaseHours"],
        ),
        "timezone": st.one_of(
            st.sampled_from(BRIEF_EDGES["timezone"]),
            st.sampled_from(ZONES),
            st.sampled_from(ALL_ZONE_NAMES),
        ),
        "startAt": st.one_of(
            st.sampled_from(BRIEF_EDGES["startAt"]),
            st.sampled_from(BRIEF_EDGES["startAt"]),
            st.sampled_from(START_AT),
            datetimes_iso,
        ),
        "priority": st.sampled_from(VALUES_BY_KEY["priority"]),
        "queueName": st.sampled_from(["shared", "edge", "\u202eeman"]),
    }
    fields.update(draw(st.fixed_dictionaries({}, optional=optional)))
    return fields


@st.composite
def _field_dicts(draw: Any) -> tuple[Any, dict[str, int]]:
    """An inputFields object (random or coherent rate fields plus other keys), with the
    verdict of each entry (by input_value_verdict: any text or number is valid)."""
    base = draw(_coherent_rate_fields() if draw(st.booleans()) else _rate_dict)
    fields = {**draw(_other_fields), **base}
    verdicts = {f"inputFields.{expand(k)}": input_value_verdict(k, v) for k, v in fields.items()}
    return fields, verdicts or {"inputFields": VALID}


def _single(pair: st.SearchStrategy[tuple[Any, int]]) -> st.SearchStrategy[tuple[Any, Any]]:
    return pair.map(lambda p: (p[0], {"inputFields": p[1]}))


INPUT_FIELDS = Pair(
    _field_dicts() | _single(_sample([MISSING, None], VALID)),
    _single(_sample([[], [1, 2], "maxThroughput=5", 5, True, [{"maxThroughput": "5"}]], INVALID)),
)


# --- whole payloads -------------------------------------------------------------------------


@dataclass
class SignedCase:
    """A signed request: the payload tree, the verdict of each path, and how it is sent."""

    payload: Any
    verdicts: dict[str, int]
    signing: str = "v2"
    query: str = ""
    ascii_only: bool = True
    spaced: bool = False
    wrap: str = ""
    twin: bool = False  # also send it with rate values swapped for equal ones of other types

    @property
    def verdict(self) -> int:
        return max(self.verdicts.values(), default=VALID)

    def blamable(self) -> set[str]:
        """Fields a 400 may name: every path not VALID, with its ancestors (and 'body' when
        a raw fragment may spoil the whole document)."""
        names: set[str] = set()
        for path, verdict in self.verdicts.items():
            if verdict != VALID:
                parts = path.split(".")
                names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
                if path.startswith("inputFields."):
                    names.add(path)  # a key may itself hold dots
        if has_raw(self.payload):
            names.add("body")
        return names


_NOT_AN_OBJECT = [MISSING, None, [], "origin", 5, True, [{"portalId": 1}]]
# the fields a "one hostile field" case may pick
FIELD_PATHS = (
    "callbackId",
    "origin",
    "origin.portalId",
    "origin.actionDefinitionId",
    "origin.actionDefinitionVersion",
    "origin.actionExecutionIndexIdentifier",
    "origin.actionExecutionIndexIdentifier.actionExecutionIndex",
    "context",
    "context.source",
    "context.workflowId",
    "object",
    "object.objectType",
    "object.objectId",
    "inputFields",
)
_fresh = st.builds(dict)  # a new dict each time: the builder fills it in
_OBJECT_PAIR = Pair(
    _v(_fresh, VALID),
    _sample(_NOT_AN_OBJECT, INVALID),
)
_IDENTIFIER_PAIR = Pair(
    _v(_fresh, VALID) | _v(_fresh, VALID) | _sample([MISSING, None], VALID),
    _sample([[], "0", 0, True, [0]], EITHER),
)
_OBJECT_OBJECT_PAIR = Pair(
    _v(_fresh, VALID) | _v(_fresh, VALID) | _sample([MISSING, None], VALID),
    _sample(["CONTACT", [], 5, True], EITHER),
)
_VERSION_PAIR = Pair(_sample([MISSING, 1, 7], VALID), _v(json_values, EITHER))
_SOURCE_PAIR = Pair(_sample(["WORKFLOWS", MISSING], VALID), _v(json_values, EITHER))


class _Builder:
    """Draws each field valid or hostile by the case's mode: 'clean' (all valid), 'one'
    (exactly one field hostile), 'wild' (each field either way)."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw
        self.mode = draw(st.sampled_from(["clean", "clean", "one", "one", "one", "wild"]))
        self.target = draw(st.sampled_from(FIELD_PATHS)) if self.mode == "one" else ""
        self.verdicts: dict[str, int] = {}

    def value(self, path: str, pair: Pair) -> Any:
        if self.mode == "wild":
            strategy = pair.valid | pair.hostile
        else:
            strategy = pair.hostile if path == self.target else pair.valid
        value, verdict = self.draw(strategy)
        if isinstance(verdict, dict):  # inputFields: a verdict per entry
            self.verdicts.update(verdict)
        else:
            self.verdicts[path] = verdict
        return value

    def put(self, doc: dict[str, Any], path: str, pair: Pair) -> Any:
        value = self.value(path, pair)
        if value is not MISSING:
            doc[path.rpartition(".")[2]] = value
        return value


@st.composite
def signed_cases(draw: Any) -> SignedCase:
    """A custom-action request built from the payload schema, each field valid or hostile."""
    b = _Builder(draw)
    doc: dict[str, Any] = {}
    b.put(doc, "callbackId", callback_ids())
    origin = b.put(doc, "origin", _OBJECT_PAIR)
    if isinstance(origin, dict):
        b.put(origin, "origin.portalId", id_values())
        b.put(origin, "origin.actionDefinitionId", id_values())
        b.put(origin, "origin.actionDefinitionVersion", _VERSION_PAIR)
        index_path = "origin.actionExecutionIndexIdentifier"
        identifier = b.put(origin, index_path, _IDENTIFIER_PAIR)
        if isinstance(identifier, dict):
            if draw(st.booleans()):
                identifier["enrollmentId"] = draw(st.integers(0, 2**63 - 1))
            path = f"{index_path}.actionExecutionIndex"
            if b.put(identifier, path, id_values(positive=False, required=False)) is MISSING:
                b.verdicts[path] = EITHER  # an identifier without its index: 400 or index 0
    context = b.put(doc, "context", _OBJECT_PAIR)
    if isinstance(context, dict):
        b.put(context, "context.source", _SOURCE_PAIR)
        b.put(context, "context.workflowId", id_values())
    obj = b.put(doc, "object", _OBJECT_OBJECT_PAIR)
    if isinstance(obj, dict):
        b.put(obj, "object.objectType", object_strings(allow_int=False))
        b.put(obj, "object.objectId", object_strings(allow_int=True))
        if draw(st.booleans()):
            obj["properties"] = draw(st.dictionaries(short_text, json_values, max_size=3))
    b.put(doc, "inputFields", INPUT_FIELDS)
    if draw(st.integers(0, 4)) == 0:
        doc["fields"] = draw(st.dictionaries(short_text, short_text, max_size=3))
    keys = list(doc)
    order = draw(st.permutations(keys)) if draw(st.integers(0, 4)) == 0 else keys
    return SignedCase(
        payload={k: doc[k] for k in order},
        verdicts=b.verdicts,
        signing=draw(st.sampled_from(["v2", "v2", "v2", "v3"])),
        query=draw(st.sampled_from(["", "", "", "?portal=62515", "?a=%2F&b=%40x&a=2"])),
        ascii_only=draw(st.booleans()),
        spaced=draw(st.booleans()),
        wrap=draw(st.sampled_from(["", "", "", " ", "\n", "\r\n\t "])),
        twin=draw(st.integers(0, 3)) == 3,
    )


def twin_value(value: Any) -> Any:
    """An equal value of another type (True/1/1.0, -0.0/0), or the value itself."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and abs(value) < 2**53:
        return True if value == 1 else False if value == 0 else float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


# --- raw requests ---------------------------------------------------------------------------


@dataclass
class RawCase:
    """A raw request: each part drawn with its verdict (see ``parts``)."""

    body: tuple[Any, ...]
    signing: str = "v2"
    method: str = "POST"
    path: str = "/api/hubspot/action"
    content_type: str | None = "application/json"
    encoding: str = ""
    chunked: bool = False
    host: str = ""
    extra: str = ""
    repeat: int = 1  # sent this many times (a replay), one after another or at once
    concurrent: bool = False
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def verdict(self) -> int:
        return max(self.parts.values(), default=VALID)


BODY_KINDS: Mapping[str, int] = {
    "valid": VALID,
    "wrapped": VALID,  # whitespace around a valid document
    "size": VALID,  # padded to max_body_bytes + delta (verdict set by delta)
    "truncate": INVALID,
    "mutate": EITHER,
    "random": INVALID,
    "nest": INVALID,
    "top": INVALID,
    "utf16": EITHER,
    "bom": EITHER,
    "empty": INVALID,
    "tokens": INVALID,
    "dupkeys": EITHER,
    "garbage_tail": INVALID,
}


@st.composite
def raw_bodies(draw: Any) -> tuple[tuple[Any, ...], int]:
    """(body description, verdict); the test turns a description into bytes."""
    kind = draw(st.sampled_from(sorted(BODY_KINDS)))
    verdict = BODY_KINDS[kind]
    if kind == "wrapped":
        return (kind, draw(st.sampled_from([" ", "\n", "\r\n", "\t", "  \n  "]))), verdict
    if kind == "size":
        delta = draw(st.sampled_from([-1, 0, 1, 2, -2]))
        return (kind, delta), VALID if delta <= 0 else INVALID
    if kind == "truncate":
        return (kind, draw(st.floats(0.0, 0.999))), verdict
    if kind == "mutate":
        ops = st.tuples(
            st.floats(0.0, 0.999),
            st.sampled_from(["flip", "insert", "delete", "replace"]),
            st.integers(0, 255),
        )
        return (kind, tuple(draw(st.lists(ops, min_size=1, max_size=4)))), verdict
    if kind == "random":
        return (kind, draw(st.binary(max_size=600))), verdict
    if kind == "nest":
        depth = draw(st.sampled_from([1023, 1024, 1025, 1100, 2000]))
        return (kind, depth, draw(st.sampled_from(["array", "object", "in_field"]))), verdict
    if kind == "top":
        top = ["[]", '"x"', "5", "null", "true", "-0.0", "[{}]", "valid-in-array", '""', "{}"]
        return (kind, draw(st.sampled_from(top))), verdict
    if kind == "utf16":
        return (
            kind,
            draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])),
        ), verdict
    if kind == "tokens":
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "undefined", "0x10", "01"]))
        return (kind, token), verdict
    if kind == "garbage_tail":
        return (kind, draw(st.sampled_from(["}", "x", "{}", "\x00", ",", "\xff"]))), verdict
    return (kind,), verdict


SIGNINGS: Mapping[str, int] = {
    "v2": VALID,
    "v3": VALID,  # v2 and v3, current timestamp
    "v3_only": EITHER,
    "v2_no_version": EITHER,
    "v2_upper": EITHER,
    "v3_space": EITHER,  # '+' in the base64 arriving as ' '
    "v3_ts_only": EITHER,  # v2, plus a timestamp header without a v3 signature
    "none": INVALID,
    "v2_wrong_secret": INVALID,
    "v2_other_body": INVALID,
    "v2_other_uri": INVALID,
    "v2_get": INVALID,
    "v3_stale": INVALID,  # 10 minutes old
    "v3_future": INVALID,  # 10 minutes ahead
    "v3_seconds": INVALID,  # epoch seconds, not milliseconds
    "v3_garbage_ts": INVALID,
    "v3_wrong_secret": INVALID,
    "v1": INVALID,  # not accepted for actions by default
    "version_v4": INVALID,
    "empty_sig": INVALID,
    "dup_sig": INVALID,
    "sig_version_only": INVALID,
    "garbage_sig": INVALID,
}
METHODS: Mapping[str, int] = {
    "POST": VALID,
    "GET": INVALID,
    "PUT": INVALID,
    "PATCH": INVALID,
    "DELETE": INVALID,
    "OPTIONS": INVALID,
    "HEAD": INVALID,
    "TRACE": INVALID,
    "PROPFIND": INVALID,
    "BREW": INVALID,
    "M-SEARCH": INVALID,
}
PATHS: Mapping[str, int] = {
    "/api/hubspot/action": VALID,
    "/api/hubspot/action?portal=62515": VALID,
    "/api/hubspot/action?a=%2F&b=%40&a=": VALID,
    "/api/hubspot/action/": INVALID,
    "/api/hubspot/ACTION": INVALID,
    "/api/hubspot/action%2F": INVALID,
    "/api/hubspot/action%00": INVALID,
    "//api/hubspot/action": EITHER,
    "/api/hubspot/./action": EITHER,
    "/api/hubspot/action;x=1": INVALID,
}
CONTENT_TYPES: Mapping[str | None, int] = {
    "application/json": VALID,
    "application/json; charset=utf-8": VALID,
    "application/json;charset=UTF-8": VALID,
    "APPLICATION/JSON": EITHER,
    "application/json; charset=utf-16": EITHER,
    "application/problem+json": EITHER,
    "": EITHER,
    None: INVALID,  # absent
    "text/plain": INVALID,
    "application/x-www-form-urlencoded": INVALID,
    "multipart/form-data; boundary=x": INVALID,
    "application/jsonx": INVALID,
    "*/*": INVALID,
    "application/json, text/plain": EITHER,
}
ENCODINGS: Mapping[str, int] = {
    "": VALID,
    "identity": EITHER,
    "gzip": EITHER,  # a valid gzip stream of the body
    "deflate": EITHER,  # a valid zlib stream
    "gzip-invalid": INVALID,  # the header says gzip, the body is plain JSON
    "gzip-truncated": INVALID,
    "deflate-invalid": INVALID,
    "br-invalid": INVALID,
    "zstd-invalid": INVALID,
    "x-custom": EITHER,
    "gzip, gzip": EITHER,
}


RAW_PARTS = ("body", "signing", "method", "path", "content_type", "encoding", "host", "extra")
# extra headers, added to (or replacing) the request's own
EXTRA_HEADERS: Mapping[str, int] = {
    "": VALID,
    "expect": VALID,  # Expect: 100-continue
    "dup_content_type": EITHER,  # application/json twice
    "sig_non_ascii": INVALID,  # a signature of 64 'é'
    "sig_5000": INVALID,  # a 5,000-character signature
    "sig_10000": INVALID,  # past aiohttp's 8,190-byte header field limit
    "version_long": INVALID,  # a 5,000-character signature version
    "many_headers": EITHER,  # 120 extra X-Pad-n headers
    "ts_long": INVALID,  # v3 timestamp of 5,000 digits (with a v3 signature)
}


@st.composite
def raw_cases(draw: Any) -> RawCase:
    """A raw request with mutated body, headers, signature, method or path: in a 'one'
    case a single part is hostile, in a 'wild' case each part may be."""
    mode = draw(st.sampled_from(["clean", "one", "one", "one", "wild"]))
    target = draw(st.sampled_from(RAW_PARTS)) if mode == "one" else ""

    def pick(part: str, table: Mapping[Any, int], common: Any) -> Any:
        if (mode == "wild" and draw(st.booleans())) or part == target:
            return draw(st.sampled_from(list(table)))
        return common

    if (mode == "wild" and draw(st.booleans())) or target == "body":
        body, body_verdict = draw(raw_bodies())
    else:
        body, body_verdict = draw(st.sampled_from([("valid",), ("wrapped", " ")])), VALID
    signing = pick("signing", SIGNINGS, draw(st.sampled_from(["v2", "v2", "v3"])))
    method = pick("method", METHODS, "POST")
    path = pick("path", PATHS, "/api/hubspot/action")
    content_type = pick("content_type", CONTENT_TYPES, "application/json")
    encoding = pick("encoding", ENCODINGS, "")
    hosts = {"": VALID, "evil.example": INVALID, "127.0.0.1:1": INVALID, "localhost": INVALID}
    host = pick("host", hosts, "")
    extra = pick("extra", EXTRA_HEADERS, "")
    parts = {
        "body": body_verdict,
        "signing": SIGNINGS[signing],
        "method": METHODS[method],
        "path": PATHS[path],
        "content_type": CONTENT_TYPES[content_type],
        "encoding": ENCODINGS[encoding],
        "host": hosts[host],
        "extra": EXTRA_HEADERS[extra],
    }
    return RawCase(
        body=body,
        signing=signing,
        method=method,
        path=path,
        content_type=content_type,
        encoding=encoding,
        chunked=draw(st.integers(0, 4)) == 4,
        host=host,
        extra=extra,
        repeat=draw(st.sampled_from([1] * 6 + [2, 3])),
        concurrent=draw(st.booleans()),
        parts=parts,
    )


# --- explicit examples: the defects found so far, run first in every run (CI included) -----


def _valid_payload(**input_fields: Any) -> dict[str, Any]:
    return {
        "callbackId": Unique("ap-n-"),
        "origin": {
            "portalId": 62515,
            "actionDefinitionId": 1234567,
            "actionExecutionIndexIdentifier": {"enrollmentId": 1, "actionExecutionIndex": 0},
        },
        "context": {"source": "WORKFLOWS", "workflowId": 55555},
        "object": {"objectId": 101, "objectType": "CONTACT"},
        "inputFields": input_fields,
    }


def _signed_example(payload: dict[str, Any], *, twin: bool = False) -> SignedCase:
    fields = payload.get("inputFields")
    verdicts: dict[str, int] = {"callbackId": VALID}
    if isinstance(fields, dict):
        verdicts.update(
            {f"inputFields.{expand(k)}": input_value_verdict(k, v) for k, v in fields.items()}
        )
    return SignedCase(payload=payload, verdicts=verdicts, twin=twin)


def _bad_portal(value: Any) -> SignedCase:
    case = _signed_example(_valid_payload())
    case.payload["origin"]["portalId"] = value
    case.verdicts["origin.portalId"] = INVALID
    return case


SIGNED_EXAMPLES = [
    _bad_portal("\u00b2"),
    _bad_portal("--5"),
    _bad_portal(Long("9", 5000)),
    _signed_example(_valid_payload(startAt="0001-01-01T00:00:00+14:00")),
    _signed_example(_valid_payload(startAt="9999-12-31T23:00:00-14:00")),
    _signed_example(_valid_payload(startAt="9999-12-31T23:00", timezone="America/New_York")),
    _signed_example(_valid_payload(queueName=Noise(3000))),
    _signed_example(_valid_payload(maxThroughput=True, timeUnit="seconds"), twin=True),
    # last: it used to kill the scheduler, which would hide the ones after it
    _signed_example(
        _valid_payload(
            maxThroughput="1",
            timeUnit="seconds",
            startAt="9999-12-31T00:00:00Z",
            releaseDays="MON",
        )
    ),
]


def _raw_example(**changes: Any) -> RawCase:
    case = RawCase(body=("valid",), parts=dict.fromkeys(RAW_PARTS, VALID))
    tables: Mapping[str, Mapping[Any, int]] = {
        "signing": SIGNINGS,
        "method": METHODS,
        "path": PATHS,
        "content_type": CONTENT_TYPES,
        "encoding": ENCODINGS,
        "extra": EXTRA_HEADERS,
    }
    for name, value in changes.items():
        setattr(case, name, value)
        if name in tables:
            case.parts[name] = tables[name][value]
    return case


RAW_EXAMPLES = [
    _raw_example(encoding="gzip-invalid"),
    _raw_example(encoding="deflate-invalid"),
    _raw_example(encoding="br-invalid"),
    _raw_example(encoding="zstd-invalid"),
    _raw_example(method="BREW"),
    _raw_example(extra="dup_content_type"),
    _raw_example(extra="sig_10000"),
    _raw_example(extra="many_headers"),
    _raw_example(method="HEAD", extra="dup_content_type"),
    _raw_example(method="HEAD", encoding="br-invalid"),
]
