"""Strict construction of config dataclasses from JSON-like dictionaries."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict_strict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**data)``, refusing keys that are not fields of ``cls`` with a clear ``ValueError``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)
