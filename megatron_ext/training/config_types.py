"""Setting values checked against their dataclass field's type, wherever they come from.

Flags are converted by argparse, but YAML hands over whatever PyYAML parsed: ``lr: 1e-3`` is the
*string* "1e-3" (YAML 1.1 needs a dot), ``shuffle: "false"`` is a truthy string, ``seed: abc`` a
string that only fails deep inside the run. :func:`coerce_setting` gives each value the field's
type with the same rules the flags use, or raises ``ValueError`` naming the setting and its source.
"""
from __future__ import annotations

import typing
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """The flag spelling of booleans (``true/false``, ``yes/no``, ``on/off``, ``1/0``)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def field_base_type(annotation: Any) -> tuple[type, bool]:
    """``(type, optional)`` of a field annotation (``Optional[int]`` -> ``(int, True)``); string
    annotations (``from __future__ import annotations``) are resolved for the builtin names."""
    if isinstance(annotation, str):
        optional = annotation.startswith("Optional[")
        name = annotation[len("Optional["):-1] if optional else annotation
        return {"int": int, "float": float, "bool": bool, "str": str, "dict": dict,
                "list": list}.get(name, object), optional
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else object), True
    return annotation, False


def coerce_setting(name: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` as the field's type, or ``ValueError`` "``source``: name=value must be ..."."""
    kind, optional = field_base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {name} must be set (got null)")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return parse_bool(value)
            raise ValueError("not a boolean")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("a boolean is not an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
            raise ValueError("not an integer")
        if kind is float:
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
            raise ValueError("not a number")
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError("not a string")
            return str(value)
        if kind in (dict, list) and not isinstance(value, kind):
            raise ValueError(f"not a {'mapping' if kind is dict else 'list'}")
        return value
    except ValueError as err:
        want = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                dict: "a mapping", list: "a list"}.get(kind, kind.__name__)
        raise ValueError(f"{source}: {name}={value!r} must be {want} ({err})") from None
