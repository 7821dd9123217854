"""Property tests of config validation: every numeric key and hubspot.block_expiration."""

from __future__ import annotations

import math
import typing
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttled import config as config_module
from throttled.config import ConfigError, Range

RANGES = config_module.ranges()
KINDS = {
    f"{section}.{name}": kind
    for section, cls in config_module.sections().items()
    for name, kind in typing.get_type_hints(cls).items()
}
# Values that keep the cross-field rule (pool_max >= pool_min + flushers) out of the way.
COMPANIONS: dict[str, dict[str, Any]] = {
    "database": {"pool_min": 1, "pool_max": 1000},
    "ingest": {"flushers": 1},
}
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def _build(key: str, value: Any, *, via_env: bool) -> config_module.Config:
    section, name = key.split(".")
    raw = {s: dict(v) for s, v in COMPANIONS.items()}
    environ = {}
    if via_env:
        environ[f"THROTTLED_{section.upper()}_{name.upper()}"] = repr(value)
    else:
        raw.setdefault(section, {})[name] = value
    cfg = config_module.from_mapping(config_module._apply_env(raw, environ))
    config_module.validate(cfg)
    return cfg


def _outside(bounds: Range, kind: type) -> st.SearchStrategy[Any]:
    if kind is int:
        low = int(bounds.lo) if bounds.above else int(bounds.lo) - 1
        return st.one_of(
            st.integers(max_value=low),
            st.integers(min_value=int(bounds.hi) + 1),
            st.just(10**400),
        )
    below = st.floats(max_value=bounds.lo, exclude_max=not bounds.above, allow_nan=False)
    above = st.floats(min_value=bounds.hi, exclude_min=True, allow_nan=False)
    return st.one_of(below, above, st.integers(min_value=int(bounds.hi) + 1), st.just(10**400))


def _inside(bounds: Range, kind: type) -> st.SearchStrategy[Any]:
    ints = st.integers(
        min_value=math.floor(bounds.lo) + 1 if bounds.above else math.ceil(bounds.lo),
        max_value=math.floor(bounds.hi),
    )
    if kind is int:
        return ints
    return st.one_of(st.floats(bounds.lo, bounds.hi, exclude_min=bounds.above), ints)


@st.composite
def _key_and_value(draw: st.DrawFn, *, inside: bool) -> tuple[str, Any]:
    key = draw(st.sampled_from(sorted(RANGES)))
    bounds, kind = RANGES[key], KINDS[key]
    if inside:
        return key, draw(_inside(bounds, kind))
    return key, draw(st.one_of(_outside(bounds, kind), NON_FINITE))


@given(_key_and_value(inside=False), st.booleans())
def test_a_number_out_of_range_or_not_finite_names_its_key(key_value, via_env):
    key, value = key_value
    with pytest.raises(ConfigError) as caught:
        _build(key, value, via_env=via_env)
    message = str(caught.value)
    assert message.startswith(key), message
    assert "\n" not in message
    assert len(message) < 300


@given(_key_and_value(inside=True), st.booleans())
def test_a_number_in_range_is_accepted(key_value, via_env):
    key, value = key_value
    cfg = _build(key, value, via_env=via_env)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value


ISO_LIKE = st.from_regex(
    r"P(\d{1,30}W)?(\d{1,30}D)?(T(\d{1,30}H)?(\d{1,30}M)?(\d{1,30}(\.\d{1,30})?S)?)?",
    fullmatch=True,
)
HUGE = st.builds(lambda n, unit: f"P{'9' * n}{unit}", st.integers(300, 6000), st.sampled_from("WD"))


def _block_expiration(text: str) -> float | str:
    """The accepted duration in seconds, or the ConfigError message."""
    try:
        cfg = config_module.from_mapping({"hubspot": {"block_expiration": text}})
        config_module.validate(cfg)
    except ConfigError as exc:
        return str(exc)
    return cfg.block_expiration_s()


@given(st.one_of(ISO_LIKE, HUGE, st.text(), st.text(alphabet="PTWDHMS0123456789.,-+ ")))
def test_block_expiration_is_refused_by_name_or_bounded(text):
    outcome = _block_expiration(text)
    if isinstance(outcome, str):
        assert outcome.startswith("hubspot.block_expiration: "), outcome
        assert "\n" not in outcome
    else:
        assert math.isfinite(outcome)
        assert 0 < outcome <= 365 * 86400
