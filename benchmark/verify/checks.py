"""The conformance checks of ``genbench check-defense`` as pytest cases, for plug-in authors.

In the spirit of scikit-learn's ``parametrize_with_checks``: a plug-in's own test suite runs
every check on its defenses, one pytest case per (defense, check), so a failing check is a
failing test named after it::

    from benchmark.verify.checks import parametrize_with_checks

    @parametrize_with_checks([MyDefense(), lambda: MyDefense(sigma=0.5)])
    def test_conformance(defense, check):
        check(defense)

``defenses`` are modules or zero-argument factories (a factory is built once, on the first
check that needs it, and shared by the checks of that defense), or a mapping from a test id to
either. ``check(defense)`` returns the :class:`~benchmark.verify.conformance.CheckResult` of a
passing check, raises :class:`ConformanceError` (an ``AssertionError``) naming the check and
the reason when it fails, and calls ``pytest.skip`` with the reason when it is skipped.

pytest is imported only when these functions are called: it is not a dependency of genbench.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from benchmark.verify.conformance import CHECKS, FAIL, SKIP, SMOKE_ATTACKS, CheckResult, run_check

__all__ = ["ConformanceCase", "ConformanceError", "DefenseCheck", "conformance_cases",
           "parametrize_with_checks"]

DefenseLike = nn.Module | Callable[[], nn.Module]


class ConformanceError(AssertionError):
    """A conformance check failed; the message names the check and says why."""


class _Built:
    """A factory built once, on first use, shared by the checks of one defense."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.factory = factory
        self._module: nn.Module | None = None
        self._error: Exception | None = None

    def get(self) -> nn.Module:
        if self._error is not None:
            raise self._error
        if self._module is None:
            try:
                self._module = self.factory()
            except Exception as exc:
                self._error = exc
                raise
        return self._module


@dataclass(frozen=True)
class DefenseCheck:
    """One named conformance check as a callable: ``check(defense)``; see the module docstring.

    ``dataset`` and ``n`` choose the probe images (the first ``n`` test images), ``device`` the
    device (default: auto), as for ``genbench check-defense``.
    """

    name: str
    dataset: str = "digits"
    n: int = 8
    device: str | None = None
    _built: _Built | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name != "build" and self.name not in CHECKS:
            raise ValueError(f"unknown conformance check {self.name!r} (known: build, "
                             f"{', '.join(CHECKS)})")

    def result(self, defense: DefenseLike) -> CheckResult:
        """The check's result on ``defense`` (a module or a zero-argument factory)."""
        target: DefenseLike = defense
        if self._built is not None and defense is self._built.factory:
            target = self._built.get
        return run_check(target, self.name, dataset=self.dataset, n=self.n,
                         device=self.device)

    def __call__(self, defense: DefenseLike) -> CheckResult:
        result = self.result(defense)
        if result.status == FAIL:
            raise ConformanceError(f"conformance check {result.name} failed: {result.why}")
        if result.status == SKIP:
            try:
                import pytest
            except ImportError:  # outside pytest a skip is a result like any other
                return result
            pytest.skip(f"{result.name}: {result.why}")
        return result

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ConformanceCase:
    """One (defense, check) pair: ``id`` is ``"<defense id>-<check name>"``."""

    id: str
    defense_id: str
    defense: DefenseLike
    check: DefenseCheck


def _label(defense: object) -> str:
    if isinstance(defense, nn.Module):
        return type(defense).__name__
    func = getattr(defense, "func", None)  # functools.partial
    name = getattr(func if func is not None else defense, "__name__", None)
    if not name or name == "<lambda>":
        return type(defense).__name__ if name is None else "factory"
    return str(name)


def conformance_cases(defenses: Iterable[DefenseLike] | Mapping[str, DefenseLike], *,
                      dataset: str = "digits", n: int = 8, device: str | None = None,
                      smoke: bool = True) -> list[ConformanceCase]:
    """Every (defense, check) pair, ``build`` first then :data:`CHECKS` in order
    (``smoke=False`` leaves out the attack smoke runs). Ids are the mapping's keys, or the
    defense's class (factory) name, numbered when two are the same."""
    if isinstance(defenses, Mapping):
        labelled = [(str(k), v) for k, v in defenses.items()]
    else:
        items = list(defenses)
        labels = [_label(d) for d in items]
        labelled = [(f"{lab}{i}" if labels.count(lab) > 1 else lab, d)
                    for i, (lab, d) in enumerate(zip(labels, items, strict=True))]
    names = ["build", *(c for c in CHECKS if smoke or c not in SMOKE_ATTACKS)]
    cases = []
    for label, defense in labelled:
        if not (isinstance(defense, nn.Module) or callable(defense)):
            raise TypeError(f"defense {label!r} must be an nn.Module or a zero-argument "
                            f"factory, got {type(defense).__name__}")
        built = None if isinstance(defense, nn.Module) else _Built(defense)
        for name in names:
            check = DefenseCheck(name, dataset=dataset, n=n, device=device, _built=built)
            cases.append(ConformanceCase(f"{label}-{name}", label, defense, check))
    return cases


def parametrize_with_checks(defenses: Iterable[DefenseLike] | Mapping[str, DefenseLike], *,
                            dataset: str = "digits", n: int = 8, device: str | None = None,
                            smoke: bool = True,
                            expected_failed_checks: Callable[[Any], Mapping[str, str]]
                            | None = None) -> Any:
    """``pytest.mark.parametrize("defense, check", ...)`` over every conformance check of every
    defense; see the module docstring.

    ``expected_failed_checks(defense)`` may return ``{check name: reason}``: those cases are
    marked ``xfail(strict=True)`` with the reason (a check that starts passing is reported).
    """
    import pytest

    params = []
    for case in conformance_cases(defenses, dataset=dataset, n=n, device=device, smoke=smoke):
        expected = expected_failed_checks(case.defense) if expected_failed_checks else {}
        marks = []
        if case.check.name in expected:
            marks.append(pytest.mark.xfail(reason=expected[case.check.name], strict=True,
                                           raises=ConformanceError))
        params.append(pytest.param(case.defense, case.check, id=case.id, marks=marks))
    return pytest.mark.parametrize("defense, check", params)
