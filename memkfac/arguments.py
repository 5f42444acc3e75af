"""How the arguments dataclasses check themselves: each bound is written once, in ``__post_init__``.

A dataclass collects what is wrong with each of its fields in a ``Checks`` and raises one
``ArgumentError`` naming them all. The command line prints it like any ``MemkfacError``; the pipeline
config (``resources/config.py``) reports each problem under its key path (``injection.finetune.epochs``),
because ``ArgumentError`` is also a ``ValueError``, which validators such as pydantic's collect.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memkfac.errors import MemkfacError


@dataclass(frozen=True)
class FieldProblem:
    field: str  # the dataclass field, e.g. "keep_mass"
    problem: str
    fix: str | None = None


class ArgumentError(MemkfacError, ValueError):
    """Bad values in an arguments dataclass: one ``FieldProblem`` per bad field."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = problems
        fixes = [p.fix for p in problems if p.fix]
        super().__init__("; ".join(p.problem for p in problems), "; ".join(fixes) or None)


class Checks:
    """What is wrong with one arguments object, collected field by field; ``done()`` raises it all."""

    def __init__(self) -> None:
        self.problems: list[FieldProblem] = []

    def require(self, ok: bool, field: str, problem: str, fix: str | None = None) -> None:
        if not ok:
            self.problems.append(FieldProblem(field, problem, fix))

    def at_least(self, field: str, value: int | float | None, low: int | float) -> None:
        """``value >= low`` (None passes: an optional field left unset)."""
        self.require(
            value is None or value >= low, field, f"{field} is {value!r}, below {low}", f"use {low} or more"
        )

    def positive(self, field: str, value: float) -> None:
        self.require(value > 0, field, f"{field} is {value!r}, not positive", "use a number above 0")

    def one_of(self, field: str, value: object, choices: Iterable) -> None:
        choices = tuple(choices)
        self.require(
            value in choices,
            field,
            f"{field} is {value!r}",
            f"use one of {', '.join(map(str, choices))}",
        )

    def subset(self, field: str, values: Iterable, choices: Iterable) -> None:
        """A non-empty selection from ``choices``."""
        values, choices = tuple(values), tuple(choices)
        unknown = [v for v in values if v not in choices]
        self.require(
            bool(values) and not unknown,
            field,
            f"unknown or no {field}: {list(values)}",
            f"use a non-empty selection of {', '.join(map(str, choices))}",
        )

    @contextlib.contextmanager
    def field(self, name: str) -> Iterator[None]:
        """Attribute a ``MemkfacError`` raised inside (by a shared check) to field ``name``."""
        try:
            yield
        except MemkfacError as e:
            self.problems.append(FieldProblem(name, e.problem, e.fix))

    def done(self) -> None:
        if self.problems:
            raise ArgumentError(self.problems)
