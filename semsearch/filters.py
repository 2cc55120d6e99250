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
# Boolean groups: how deep they nest and how many filters they hold in all (a request's whole tree).
MAX_GROUP_DEPTH = 5
MAX_GROUP_FILTERS = 64
# The scalar field every tenant-aware collection has (a Milvus partition key); see semsearch/store/schema.py.
TENANT_FIELD = "tenant"
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

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
    EXISTS = "exists"  # present and not null; takes no value
    CONTAINS = "json_contains"  # an array holding the value
    CONTAINS_ANY = "json_contains_any"
    CONTAINS_ALL = "json_contains_all"


MULTI_VALUE = (Operator.IN, Operator.NOT_IN, Operator.CONTAINS_ANY, Operator.CONTAINS_ALL)


class Logic(StrEnum):
    AND = "and"
    OR = "or"
    NOT = "not"  # NOT of the AND of the members


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
        multi = self.operator in MULTI_VALUE
        if self.operator is Operator.EXISTS:
            if self.values:
                raise InvalidInputError(f"filter on {self.field!r}: EXISTS takes no value")
            return
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


@dataclass(frozen=True)
class FilterGroup:
    """A boolean combination of filters and nested groups; `check_limits` bounds the whole tree."""

    logic: Logic
    filters: tuple[MetadataFilter, ...] = ()
    groups: tuple[FilterGroup, ...] = ()

    def __post_init__(self) -> None:
        if not self.filters and not self.groups:
            raise InvalidInputError(f"filter group {self.logic.name} has no filters or groups")

    def depth(self) -> int:
        return 1 + max((group.depth() for group in self.groups), default=0)

    def size(self) -> int:
        return len(self.filters) + sum(group.size() for group in self.groups)


def check_group_limits(depth: int, size: int, where: str = "filter") -> None:
    """Limits of a group tree, checked while reading it (a hostile tree is never built in full)."""
    if depth > MAX_GROUP_DEPTH:
        raise InvalidInputError(f"{where}: filter groups nest deeper than {MAX_GROUP_DEPTH} levels")
    if size > MAX_GROUP_FILTERS:
        raise InvalidInputError(f"{where}: more than {MAX_GROUP_FILTERS} filters in the groups")


@dataclass(frozen=True)
class TenantFilter:
    """Rows of one tenant (the default tenant is ''): added by the service, never by a user string."""

    tenant: str

    def __post_init__(self) -> None:
        check_tenant(self.tenant)


def check_tenant(tenant: str, where: str = "tenant") -> str:
    if tenant and not TENANT_PATTERN.match(tenant):
        raise InvalidInputError(
            f"{where} {tenant[:80]!r} is not allowed: 1 to 63 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant


Condition = MetadataFilter | FilterGroup | TenantFilter


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


def render_filters(filters: Sequence[Condition], json_field: str = "metadata") -> str:
    """AND of all filters (and groups, tenant conditions), or '' when there are none."""
    return " and ".join(f"({_render(item, json_field)})" for item in filters)


def _render(item: Condition, json_field: str) -> str:
    if isinstance(item, TenantFilter):
        return f"{TENANT_FIELD} == {render_literal(item.tenant)}"
    if isinstance(item, FilterGroup):
        members = [f"({_render(f, json_field)})" for f in item.filters]
        members += [f"({_render(g, json_field)})" for g in item.groups]
        joined = (" or " if item.logic is Logic.OR else " and ").join(members)
        return f"not ({joined})" if item.logic is Logic.NOT else joined
    target = f'{json_field}[{json.dumps(item.field)}]'
    if item.operator in (Operator.IN, Operator.NOT_IN):
        # Spelled as ==/!= chains: Milvus Lite accepts `in` on scalar fields only, not JSON paths.
        compare, join = ("==", " or ") if item.operator is Operator.IN else ("!=", " and ")
        return join.join(f"{target} {compare} {render_literal(v)}" for v in item.values)
    if item.operator is Operator.EXISTS:
        return f"exists {target}"
    if item.operator is Operator.CONTAINS:
        return f"json_contains({target}, {render_literal(item.values[0])})"
    if item.operator in (Operator.CONTAINS_ANY, Operator.CONTAINS_ALL):
        return f"{item.operator.value}({target}, [{', '.join(render_literal(v) for v in item.values)}])"
    return f"{target} {item.operator.value} {render_literal(item.values[0])}"


def render_string_in(field: str, values: Sequence[str]) -> str:
    """`field in [...]` over a scalar VARCHAR field (ids), for deletes and lookups."""
    if not FIELD_PATTERN.match(field):
        raise InvalidInputError(f"bad field name {field!r}")
    for value in values:
        check_scalar(field, value)
    return f"{field} in [{', '.join(render_literal(v) for v in values)}]"
