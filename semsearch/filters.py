"""Typed metadata filters, rendered into Milvus boolean expressions by this module alone.

User input never reaches an expression as text: field names must match a strict identifier
pattern and values are typed scalars rendered by `render_literal`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from semsearch.errors import InvalidInputError

FIELD_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_IN_VALUES = 256
MAX_STRING_VALUE_CHARS = 1024

Scalar = str | int | float | bool


class Operator(StrEnum):
    EQ = "=="
    NE = "!="
    GT = ">"
    GTE = ">="
    LT = "<"
    LTE = "<="
    IN = "in"
    NOT_IN = "not in"


@dataclass(frozen=True)
class MetadataFilter:
    field: str
    operator: Operator
    values: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        if not FIELD_PATTERN.match(self.field):
            raise InvalidInputError(
                f"filter field {self.field!r} is not allowed: use letters, digits and underscores"
            )
        multi = self.operator in (Operator.IN, Operator.NOT_IN)
        if multi and not 1 <= len(self.values) <= MAX_IN_VALUES:
            raise InvalidInputError(
                f"filter on {self.field!r}: {self.operator.name} takes 1 to {MAX_IN_VALUES} values"
            )
        if not multi and len(self.values) != 1:
            raise InvalidInputError(f"filter on {self.field!r}: {self.operator.name} takes exactly one value")
        ordering = self.operator in (Operator.GT, Operator.GTE, Operator.LT, Operator.LTE)
        for value in self.values:
            check_scalar(self.field, value)
            if ordering and isinstance(value, bool | str):
                raise InvalidInputError(
                    f"filter on {self.field!r}: {self.operator.name} needs a number, got {type(value).__name__}"
                )


def check_scalar(field: str, value: Scalar) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInputError(f"filter on {field!r}: value must be a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        raise InvalidInputError(f"filter on {field!r}: integer out of range")
    if isinstance(value, str):
        if len(value) > MAX_STRING_VALUE_CHARS:
            raise InvalidInputError(f"filter on {field!r}: string value longer than {MAX_STRING_VALUE_CHARS}")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise InvalidInputError(f"filter on {field!r}: string value has control or surrogate characters")


def render_literal(value: Scalar) -> str:
    """A Milvus expression literal for a typed value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    # A double-quoted literal: backslash and quote escaped, nothing else can appear (checked above).
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_filters(filters: Sequence[MetadataFilter], json_field: str = "metadata") -> str:
    """AND of all filters, or '' when there are none."""
    clauses = []
    for item in filters:
        target = f'{json_field}[{json.dumps(item.field)}]'
        if item.operator in (Operator.IN, Operator.NOT_IN):
            # Spelled as ==/!= chains: Milvus Lite accepts `in` on scalar fields only, not JSON paths.
            compare, join = ("==", " or ") if item.operator is Operator.IN else ("!=", " and ")
            clauses.append(join.join(f"{target} {compare} {render_literal(v)}" for v in item.values))
        else:
            clauses.append(f"{target} {item.operator.value} {render_literal(item.values[0])}")
    return " and ".join(f"({clause})" for clause in clauses)


def render_string_in(field: str, values: Sequence[str]) -> str:
    """`field in [...]` over a scalar VARCHAR field (ids), for deletes and lookups."""
    if not FIELD_PATTERN.match(field):
        raise InvalidInputError(f"bad field name {field!r}")
    for value in values:
        check_scalar(field, value)
    return f"{field} in [{', '.join(render_literal(v) for v in values)}]"
