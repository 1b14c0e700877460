"""Settings dataclasses that double as command-line flags: one declaration per setting.

A setting is a dataclass field declared with `option(...)`: the field is the typed value a caller (an
experiment, a test) passes, and the flag --FIELD-NAME with its help text is what argparse shows. So its
default, help and check live in one place, and `run(Settings(...))` and `main(["--flag", ...])` train
the same way. A command whose settings extend another's changes a default with `defaults(...)`, not by
declaring the field again.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any


def option(default: Any, help: str, check: Callable[[Any], str | None] | None = None, **argparse_options: Any) -> Any:
    """A settings field that is also the flag --NAME (underscores become dashes).

    argparse_options are add_argument's keywords (choices, required, metavar, ...) plus group= (the
    --help heading it is listed under) and exclusive= (flags sharing an exclusive= name exclude each
    other). The flag's type and nargs come from the field's annotation. check(value) says what is wrong
    with a value (None when nothing is): `check_settings` applies it, and the type and choices, to
    whatever filled the field, flags or a caller.
    """
    metadata = {"help": help, **argparse_options, **({"check": check} if check else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_flags(parser: argparse.ArgumentParser, settings: type) -> None:
    """One flag per option() field of the `settings` dataclass, in field order, under their groups."""
    hints = typing.get_type_hints(settings)
    groups: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        options = dict(field.metadata)
        group, together = options.pop("group", None), options.pop("exclusive", None)
        options.pop("check", None)
        target = parser
        if group is not None:
            if group not in groups:
                groups[group] = parser.add_argument_group(group)
            target = groups[group]
        if together is not None:
            if together not in exclusive:
                exclusive[together] = target.add_mutually_exclusive_group()
            target = exclusive[together]
        kind = hints[field.name]
        if kind is bool:
            options.setdefault("action", "store_true")
        else:
            scalar, nargs = _flag_type(kind)
            options.setdefault("type", scalar)
            if nargs is not None:
                options.setdefault("nargs", nargs)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        target.add_argument("--" + field.name.replace("_", "-"), default=default, **options)


def _flag_type(kind: Any) -> tuple[type, int | str | None]:
    """(the type of one value, nargs) of an annotation: X, X | None, list[X] or tuple[X, ...]."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    origin = typing.get_origin(kind)
    if origin is list:
        return typing.get_args(kind)[0], "+"
    if origin is tuple:
        return typing.get_args(kind)[0], len(typing.get_args(kind))
    return kind, None


# --- what a setting may be ----------------------------------------------------------------------

def at_least(low: float) -> Callable[[Any], str | None]:
    """A check: the number is finite and at least `low`."""
    return lambda value: None if math.isfinite(value) and value >= low else f"must be at least {low:g}"


def above(low: float) -> Callable[[Any], str | None]:
    """A check: the number is finite and above `low`."""
    return lambda value: None if math.isfinite(value) and value > low else f"must be above {low:g}"


def fraction(value: float) -> str | None:
    """A check: a share in [0, 1)."""
    return None if 0 <= value < 1 else "must be in [0, 1)"


def check_settings(settings: Any) -> None:
    """Raise ValueError, naming the flag, for the first field of a settings dataclass whose value has the
    wrong type, is not among its choices or fails its check. Path-like values of str fields become str."""
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata:
            continue
        value = getattr(settings, field.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(settings, field.name, value)
        problem = setting_problem(type(settings), field.name, value)
        if problem:
            raise ValueError(f"--{field.name.replace('_', '-')} {problem}, got {value!r}")


def setting_problem(settings: type, name: str, value: Any) -> str | None:
    """What is wrong with `value` for the field `name` of the `settings` dataclass, or None."""
    field = next(f for f in dataclasses.fields(settings) if f.name == name)
    kind = typing.get_type_hints(settings)[name]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        element = typing.get_args(kind)[0]
        length = len(typing.get_args(kind)) if origin is tuple and ... not in typing.get_args(kind) else None
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            return f"must be a list of {length or 'one or more'} {_TYPE_NAMES[element]} values"
        values = list(value)
    else:
        element, values = kind, [value]
    for item in values:
        if not _is_a(item, element):
            return f"must be {_TYPE_NAMES[element]}"
        if "choices" in field.metadata and item not in field.metadata["choices"]:
            return f"must be one of {', '.join(map(str, field.metadata['choices']))}"
        if "check" in field.metadata and (problem := field.metadata["check"](item)):
            return problem
    return None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is_a(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def settings_from(settings: type, namespace: argparse.Namespace) -> Any:
    """The `settings` dataclass filled from parsed flags."""
    return settings(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(settings)
                       if "help" in field.metadata})


def run_identity(settings: Any, defines_run: Iterable[str], **derived: Any) -> dict[str, Any]:
    """What --resume compares: the settings named in defines_run, plus values derived from them."""
    return {**{name: getattr(settings, name) for name in defines_run}, **derived}


def check_classified(settings: type, defines_run: Iterable[str], may_change: Iterable[str]) -> None:
    """Every flag of `settings` is either part of a run's identity or allowed to change on --resume."""
    flags = {field.name for field in dataclasses.fields(settings) if "help" in field.metadata}
    defines_run, may_change = set(defines_run), set(may_change)
    problems = {"in both lists": defines_run & may_change, "in neither list": flags - defines_run - may_change,
                "not flags": (defines_run | may_change) - flags}
    problems = {what: sorted(names) for what, names in problems.items() if names}
    if problems:
        raise AssertionError(f"{settings.__name__}: DEFINES_RUN and MAY_CHANGE are out of date: {problems}")


def defaults(**values: Any) -> Callable[[type], type]:
    """A class decorator, placed under @dataclass: the inherited settings named here default to these
    values in this class (its flags and their help say so); their help, checks and groups stay the ones
    declared in the base class."""
    def apply(cls: type) -> type:
        if "__dataclass_fields__" in vars(cls):
            raise TypeError(f"@defaults must come under @dataclass on {cls.__name__}, so that its fields take them")
        inherited = {f.name: (f, owner) for owner in reversed(cls.__mro__[1:])
                     for f in getattr(owner, "__dataclass_fields__", {}).values()}
        annotations = cls.__dict__.get("__annotations__", {})
        cls.__annotations__ = annotations
        for name, value in values.items():
            field, owner = inherited[name]
            annotations[name] = typing.get_type_hints(owner)[name]
            metadata = dict(field.metadata)
            if "help" in metadata:
                metadata["help"] = _with_default(metadata["help"], value)
            setattr(cls, name, dataclasses.field(default=value, metadata=metadata) if not isinstance(value, (list, dict))
                    else dataclasses.field(default_factory=lambda v=value: type(v)(v), metadata=metadata))
        return cls
    return apply


def _with_default(help: str, value: Any) -> str:
    """A help text whose trailing "(default: ...)" says `value` (for flags whose default a command changes)."""
    head, marker, _ = help.rpartition("(default: ")
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"{head}(default: {shown})" if marker else help
