"""Attack traits by registry name and parameters, for the report's flags and worst case."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from benchmark.api.attack import AttackTraits
from benchmark.plugins.builtin import ATTACKS

__all__ = ["attack_traits", "is_diagnostic"]


def attack_traits(name: str, params: Mapping[str, Any] | str | None = None) -> AttackTraits:
    """The traits the attack registered as ``name`` declares for ``params`` (a dict or its JSON).

    An attack that is no longer installed, or a third-party class that declares nothing, gets
    the defaults (an exact-gradient, non-diagnostic attack)."""
    if isinstance(params, str):
        try:
            params = json.loads(params) if params else {}
        except json.JSONDecodeError:
            params = {}
    if not isinstance(params, Mapping):
        params = {}
    return _traits(name, json.dumps(dict(params), sort_keys=True, default=str))


@functools.lru_cache(maxsize=512)
def _traits(name: str, params_json: str) -> AttackTraits:
    try:
        cls = ATTACKS.get(name)
    except Exception:  # not installed any more: nothing is known of it
        return AttackTraits()
    declared = getattr(cls, "traits", None)
    if callable(declared):
        try:
            traits = declared(json.loads(params_json))
            if isinstance(traits, AttackTraits):
                return traits
        except Exception:  # noqa: S110 - a broken override falls back to the attributes
            pass
    gradient = getattr(cls, "gradient", "exact")
    return AttackTraits(gradient=gradient if isinstance(gradient, str) else "exact",
                        diagnostic=bool(getattr(cls, "diagnostic", False)))


def is_diagnostic(name: str) -> bool:
    """Whether the attack declares ``diagnostic = True`` (e.g. ``fixed-noise``, which pins the
    defense's randomness): its row is reported but never enters the worst case."""
    return attack_traits(name).diagnostic
