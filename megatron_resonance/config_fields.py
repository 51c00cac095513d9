"""The one config vocabulary of every config dataclass (``LlamaConfig``, ``RopeConfig``, the training
``Config``'s sections, PosGen's ``Preset``):

- help: written once per field, as its metadata (:func:`field`); command-line flags and reports read it there;
- choices: a ``typing.Literal`` type, checked by :func:`check_choices` (one line naming the field, the value
  and the choices);
- types: read with ``typing.get_type_hints`` (:func:`field_types`), never from the annotation's text;
- :func:`from_dict`: a dataclass from a mapping (a YAML section, a stored ``megatron_resonance.json``), one line
  for an unknown key or a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Dict, Literal, Optional, Tuple, Union

from megatron_resonance.errors import ConfigError


def field(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: Union[str, bool] = True,
    label: Optional[str] = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text. ``flag``: the command-line flag's name (underscores) where it is
    not the field's, False for a field without a flag. ``label``: how an error names the field (default:
    its flag, ``--name``)."""
    metadata = {"help": help, "flag": flag, "label": label}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def flag_of(f: dataclasses.Field) -> Optional[str]:
    """The field's flag name with underscores (``rope_kind`` for ``RopeConfig.kind``); None: no flag."""
    flag = f.metadata.get("flag", True)
    return f.name if flag is True else flag or None


def label_of(f: dataclasses.Field) -> str:
    return f.metadata.get("label") or "--" + (flag_of(f) or f.name).replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> Dict[str, Any]:
    """Each field's type, resolved (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def unwrap(hint: Any) -> Tuple[Any, bool]:
    """(the type inside ``Optional[...]``, whether None is allowed); a Literal stands for its choices' type."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is Union and type(None) in args
    if optional:
        rest = tuple(a for a in args if a is not type(None))
        hint = rest[0] if len(rest) == 1 else Union[rest]
    if typing.get_origin(hint) is Literal:
        hint = type(typing.get_args(hint)[0])
    return hint, optional


def choices(hint: Any) -> Tuple[Any, ...]:
    """A Literal type's choices (also inside Optional); () for any other type."""
    if typing.get_origin(hint) is Union:
        hint = next((a for a in typing.get_args(hint) if typing.get_origin(a) is Literal), None)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_choices(obj: Any) -> None:
    """ConfigError for the first Literal field of the dataclass ``obj`` whose value is not one of its choices."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        allowed, value = choices(hints[f.name]), getattr(obj, f.name)
        if allowed and value not in allowed and not (value is None and unwrap(hints[f.name])[1]):
            raise ConfigError(f"unknown {label_of(f)} {value!r}; expected one of {', '.join(allowed)}")


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def check_keys(cls: type, given: Dict[str, Any], where: str) -> None:
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")


def check_types(cls: type, given: Dict[str, Any], where: str, section: str) -> Dict[str, Any]:
    """``given`` with each value checked against ``cls``'s field type (int, float, bool, str or a Literal of
    them, optionally None); ConfigError naming the field, the value and the expected type. A float field
    also takes an integer, and a number YAML 1.1 reads as a string (``3e-4``: no dot)."""
    hints = field_types(cls)
    out = dict(given)
    for name, value in given.items():
        expected, optional = unwrap(hints.get(name))
        if expected not in _TYPE_NAMES or (value is None and optional):
            continue
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and not ok and not isinstance(value, bool):
            if isinstance(value, int):
                ok = True
            elif isinstance(value, str):
                try:
                    out[name], ok = float(value), True
                except ValueError:
                    pass
        if not ok:
            field_name = f"{section}.{name}" if section else name
            expected_text = _TYPE_NAMES[expected] + (" or null" if optional else "")
            raise ConfigError(f"{where}: {field_name} is {value!r}, expected {expected_text}")
    return out


def mapping(value: Any, where: str, section: str) -> Dict[str, Any]:
    """A section's mapping (None: empty); ConfigError for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {section} is {value!r}, expected a mapping of keys")
    return dict(value)


def from_dict(cls: type, d: Any, where: str = "config", section: str = "") -> Any:
    """``cls(**d)`` for the section ``section`` of ``where`` (a file, a checkpoint): one ConfigError line for a
    key ``cls`` has no field for or a value of the wrong type; the class's own checks follow."""
    d = mapping(d, where, section or "config")
    check_keys(cls, d, f"{where}: {section}" if section else where)
    return cls(**check_types(cls, d, where, section))


def same_named(source: Any, names: str) -> Dict[str, Any]:
    """``{name: source.<name>}`` for each of the space-separated ``names``: the settings one config hands to
    another (ours to megatron-core's, a preset to the trainer's) under the same names."""
    return {name: getattr(source, name) for name in names.split()}
