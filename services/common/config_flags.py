"""Command-line flags derived from a frozen config dataclass, and the dataclass built back from them.

A service's configuration is written once: a field, its type, its default and its docstring. The flag
is `--field-name` (dashes for underscores), its help the field's docstring, its default the field's,
its type the field's annotation (`int`, `float`, `str`, `str | None`, `bool` as `--x/--no-x`,
`tuple[str, ...]` as a repeatable flag). A field's `metadata` adjusts what the name cannot say:

    inference_targets: tuple[str, ...] = field(default=(), metadata=flag("--inference-target"))

`flag(name, default=..., metavar=..., choices=...)` renames the flag (a repeatable one is named in the
singular), gives the command line a default where the dataclass has none or a different one, and so on.
`__post_init__` checks stay in the dataclass: a bad value fails there with a message that names the flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_UNSET: Any = object()


def flag(
    name: str | None = None,
    *,
    default: Any = _UNSET,
    metavar: str | None = None,
    choices: tuple[Any, ...] | None = None,
) -> dict[str, Any]:
    """A field's metadata for `add_config_args`: the flag's name and what differs from the field."""
    meta: dict[str, Any] = {}
    if name is not None:
        meta["flag"] = name
    if default is not _UNSET:
        meta["flag_default"] = default
    if metavar is not None:
        meta["metavar"] = metavar
    if choices is not None:
        meta["choices"] = choices
    return {"cli": meta}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for statement, following in itertools.pairwise(body):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _flag_name(config_field: dataclasses.Field[Any]) -> str:
    return config_field.metadata.get("cli", {}).get("flag") or "--" + config_field.name.replace("_", "-")


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (tuple, list)


def _scalar(annotation: Any) -> Any:
    """int for `int`, str for `str | None`, the item type for `tuple[str, ...]`."""
    if _is_sequence(annotation):
        return typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return annotation


def add_config_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (but `exclude`). `defaults` and `helps` override a
    field's default and help for this command (e.g. each service's own port)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for config_field in dataclasses.fields(cls):
        if config_field.name in exclude:
            continue
        meta = config_field.metadata.get("cli", {})
        annotation = hints[config_field.name]
        if defaults and config_field.name in defaults:
            default = defaults[config_field.name]
        elif "flag_default" in meta:
            default = meta["flag_default"]
        elif config_field.default is not dataclasses.MISSING:
            default = config_field.default
        elif config_field.default_factory is not dataclasses.MISSING:
            default = config_field.default_factory()
        else:
            default = None
        options: dict[str, Any] = {
            "dest": config_field.name,
            "help": (helps or {}).get(config_field.name) or docs.get(config_field.name, ""),
        }
        if "metavar" in meta:
            options["metavar"] = meta["metavar"]
        if "choices" in meta:
            options["choices"] = meta["choices"]
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
            options["default"] = default
        elif _is_sequence(annotation):
            # repeatable; None when never given, so the flag's default applies (see config_from_args)
            options["action"] = "append"
            options["type"] = _scalar(annotation)
            options["default"] = None
            options["help"] += f" (repeat for several; default {', '.join(map(str, default)) or 'none'})"
        else:
            options["type"] = _scalar(annotation)
            options["default"] = default
        parser.add_argument(_flag_name(config_field), **options)
    parser.set_defaults(**{f"_config_defaults_{cls.__name__}": defaults or {}})


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The dataclass `cls` from flags `add_config_args` added; `values` give the fields it excluded. A
    value `__post_init__` refuses raises SystemExit with its message."""
    hints = typing.get_type_hints(cls)
    defaults = getattr(args, f"_config_defaults_{cls.__name__}", {})
    for config_field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if config_field.name in values or not hasattr(args, config_field.name):
            continue
        value = getattr(args, config_field.name)
        if _is_sequence(hints[config_field.name]):
            if value is None:
                meta = config_field.metadata.get("cli", {})
                if config_field.name in defaults:
                    value = defaults[config_field.name]
                elif "flag_default" in meta:
                    value = meta["flag_default"]
                elif config_field.default is not dataclasses.MISSING:
                    value = config_field.default
                else:
                    value = ()
            value = tuple(value)
        values[config_field.name] = value
    try:
        return cls(**values)
    except ValueError as error:
        raise SystemExit(str(error)) from None
