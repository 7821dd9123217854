"""From a validated action request to the row to store: queue, rate policy, priority, deadline."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from throttled import metrics, rates
from throttled.db.repository import NewAction
from throttled.hubspot.action import ActionRequest, PayloadError

log = structlog.get_logger(__name__)

PRIORITY_RANGE = (-1_000_000, 1_000_000)
MAX_STORED_TEXT = 255  # characters in a stored input value (a queue name among them)
# The latest deadline stored: one every part of throttled can decode and evaluate.
MAX_DEADLINE = rates.HORIZON_EPOCH
# The input fields kept with each stored action: the ones throttled reads (rate, schedule,
# priority, shared queue), which explain the policy it got. A workflow may map anything else
# into its inputs, contact data included; that is HubSpot's to keep, not ours.
STORED_INPUT_KEYS: frozenset[str] = frozenset((*rates.INPUT_KEYS, "priority", "queueName"))
_NOT_RATE = frozenset(("priority", "queueName"))


class Intake:
    """Resolves each request's queue and rate (input fields > admin config > defaults)."""

    def __init__(
        self,
        *,
        defaults: rates.PolicySpec,
        block_expiration_s: float,
        action_configs: Mapping[tuple[int, int], rates.PolicySpec] | None = None,
        clock: Callable[[], float],
    ) -> None:
        self._defaults = defaults
        self._expiry_s = block_expiration_s
        self.action_configs: dict[tuple[int, int], rates.PolicySpec] = dict(action_configs or {})
        self._clock = clock
        # (policy, the rate fields it came from), keyed on those fields and the config
        self._policy_cache: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any]]] = {}

    def build(self, request: ActionRequest) -> NewAction:
        """The row to store for this request."""
        stored = _stored_fields(request.input_fields)
        policy, rate_inputs = self._policy(request, stored)
        return NewAction(
            callback_id=request.callback_id,
            queue_key=request.queue_key(),
            portal_id=request.portal_id,
            priority=self._priority(request),
            deadline=min(self._clock() + self._expiry_s, MAX_DEADLINE),
            policy=policy,
            workflow_id=request.workflow_id,
            object_type=request.object_type,
            object_id=request.object_id,
            input_fields=stored,
            action_id=request.action_definition_id,
            rate_inputs=rate_inputs,
        )

    def set_config(self, portal_id: int, action_id: int, spec: rates.PolicySpec | None) -> None:
        """Use (or, with None, stop using) an admin config for new actions. The policy cache
        is emptied: it is keyed on the config's identity, which a later one may reuse."""
        if spec is None:
            self.action_configs.pop((portal_id, action_id), None)
        else:
            self.action_configs[portal_id, action_id] = spec
        self._policy_cache.clear()

    def replace_configs(self, configs: Mapping[tuple[int, int], rates.PolicySpec]) -> None:
        """Use exactly these admin configs from now on (another instance changed some)."""
        self.action_configs = dict(configs)
        self._policy_cache.clear()

    @property
    def defaults(self) -> rates.PolicySpec:
        """The last rate source: the config file's `[defaults]`."""
        return self._defaults

    def resolve(
        self, rate_inputs: Mapping[str, Any] | None, admin: rates.PolicySpec | None
    ) -> dict[str, Any]:
        """The policy for these rate input fields under this admin config (a queue
        re-resolved after its config changed)."""
        spec, _ = rates.parse_input_fields(rate_inputs or {})
        return rates.resolve([spec, *([admin] if admin else []), self._defaults]).to_json()

    def _policy(
        self, request: ActionRequest, stored: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        admin = self.action_configs.get((request.portal_id, request.action_definition_id))
        # Keyed on the rate fields given (stored holds them, with priority and queueName),
        # types included: True == 1 and 1.0 == 1, but they do not parse alike.
        rate_fields = tuple([(k, v.__class__, v) for k, v in stored.items() if k not in _NOT_RATE])
        cache_key = (rate_fields, id(admin))
        cached = self._policy_cache.get(cache_key)
        if cached is not None:
            return cached
        spec, problems = rates.parse_input_fields(stored)
        for problem in problems:
            metrics.INPUT_PROBLEMS.inc()
            log.warning("input_field_invalid", portal_id=request.portal_id, problem=problem)
        specs = [spec, *([admin] if admin else []), self._defaults]
        policy = rates.resolve(specs).to_json()
        if len(self._policy_cache) > 10_000:
            self._policy_cache.clear()
        inputs = {k: v for k, v in stored.items() if k not in _NOT_RATE}
        self._policy_cache[cache_key] = (policy, inputs)
        return policy, inputs

    @staticmethod
    def _priority(request: ActionRequest) -> int:
        raw = request.input_fields.get("priority")
        if raw is None or raw == "":
            return 0
        value = _integer(raw)
        if value is None:
            metrics.INPUT_PROBLEMS.inc()
            log.warning(
                "input_field_invalid",
                portal_id=request.portal_id,
                problem=f"inputFields.priority: {raw!r} is not an integer",
            )
            return 0
        return max(PRIORITY_RANGE[0], min(PRIORITY_RANGE[1], value))


def _integer(raw: Any) -> int | None:
    """An integer from an int, an integral float or a plain integer string; else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() else None  # (finite: parse() admits no inf)
    text = raw.strip() if isinstance(raw, str) else ""
    return int(text) if _INTEGER_TEXT.fullmatch(text) else None


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,18}")


def _stored_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The input fields kept with the row; a long text among them is refused (400), so every
    stored string is bounded (a queue name ends up in an indexed key)."""
    if not fields:
        return {}
    stored = {k: v for k, v in fields.items() if k in STORED_INPUT_KEYS and v is not None}
    for key, value in stored.items():
        if type(value) is str and len(value) > MAX_STORED_TEXT:
            raise PayloadError(
                f"inputFields.{key}", f"must be at most {MAX_STORED_TEXT} characters"
            )
    return stored
