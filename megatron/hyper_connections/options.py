"""Every Hyper-Connection option, declared once on its ``TransformerConfig`` field.

A field of the package's ``TransformerConfig`` is an HC option when its metadata holds an
``Option`` (``hc_option`` builds such a field). Its type, default and docstring, with what the
``Option`` adds, are the one declaration from which everything else is derived:

- the config's own checks: the value allowed, and the refusal of an option set without the
  switch that gives it an effect or for a variant it does not apply to;
- the keyword arguments of the HC and mHC modules (``module_kwargs``);
- the checkpoint record and what a checkpoint must match (``must_match_fields``);
- the command-line flags of the package's trainer and of Megatron-LM's
  (``add_hyper_connection_arguments`` and ``hyper_connection_kwargs``);
- the README's options table (``options_table``; ``python -m megatron.hyper_connections.options``
  prints it, and a test fails when the README's copy is stale).

Flags follow Megatron-LM's convention for config dataclasses (``argparse_meta`` in the field's
metadata, help from the field's docstring): ``--`` and the field name with hyphens, a switch for
a bool, and the field's default as the flag's default, so that an unchanged flag is an unchanged
field. To add an option: declare the field in ``config.TransformerConfig`` with ``hc_option``,
read it where it acts, and regenerate the README table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import math
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "HC",
    "MHC",
    "MHC_LITE",
    "Option",
    "add_hyper_connection_arguments",
    "flag_of",
    "hc_option",
    "hyper_connection_kwargs",
    "hyper_connection_options",
    "hyper_connection_variant",
    "kind_of",
    "module_kwargs",
    "must_match_fields",
    "options_table",
    "variant_name",
]

# The kinds of hyper-connection an option may apply to.
HC = "HC"
"""``HyperConnection``: dynamic or static HC, and Frac-Connections."""
MHC = "mHC"
"""``ManifoldHyperConnection`` with H_res from Sinkhorn-Knopp."""
MHC_LITE = "mHC-lite"
"""``ManifoldHyperConnection`` with H_res a mixture of permutation matrices."""

USE_HC = "use_hyper_connections"
USE_MHC = "use_manifold_hyper_connections"


@dataclasses.dataclass(frozen=True)
class Allowed:
    """The values an option takes: a test, and the words for it in error messages."""

    words: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:
            return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


POSITIVE_INT = Allowed("an integer >= 1", lambda v: _is_int(v) and v >= 1)
OPTIONAL_POSITIVE_INT = Allowed("None or an integer >= 1", lambda v: v is None or POSITIVE_INT(v))
PROBABILITY = Allowed("a float in [0, 1)", lambda v: not isinstance(v, bool) and 0.0 <= v < 1.0)
FINITE_FLOAT = Allowed("a finite float", lambda v: not isinstance(v, bool) and math.isfinite(v))


@dataclasses.dataclass(frozen=True)
class Option:
    """What an HC option's config field does beyond holding its value."""

    needs: str | None = USE_HC
    """The switch without which the option has no effect; set without it, it is refused.
    None for the switch ``use_hyper_connections`` itself."""
    kinds: tuple[str, ...] = (HC, MHC, MHC_LITE)
    """The kinds of hyper-connection it applies to; set for another, it is refused."""
    module_arg: str | None = None
    """The keyword argument of the modules' constructors that receives it."""
    must_match: bool = False
    """A checkpoint must have been made with the same value: the option decides which
    parameters exist, or the function the model computes with them. (The variant, its kind
    and static or dynamic, is always recorded.)"""
    allowed: Allowed | None = None
    """The values it may take, checked when the config is built."""


_OPTION_KEY = "hyper_connections"


def hc_option(default: Any, *, flag: str | None = None, **option: Any) -> Any:
    """A dataclass field declaring an HC option (see ``Option`` for ``option``).

    ``flag`` replaces the derived flag name; for a bool that defaults to True it is the
    switch that sets the field to False (Megatron-LM would derive ``--no-<name>``).
    """
    metadata: dict[str, Any] = {_OPTION_KEY: Option(**option)}
    if flag is not None:
        metadata["argparse_meta"] = {"arg_names": [flag]}
    return dataclasses.field(default=default, metadata=metadata)


def _config_class() -> type:
    from .config import TransformerConfig

    return TransformerConfig


def hyper_connection_options(
    config_class: type | None = None,
) -> list[tuple[dataclasses.Field, Option]]:
    """The declared HC options of ``config_class`` (the package's ``TransformerConfig``), in
    declaration order, each as its dataclass field and its ``Option``."""
    return list(_options(config_class or _config_class()))


def _options(config_class: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    for field in dataclasses.fields(config_class):
        option = field.metadata.get(_OPTION_KEY)
        if option is not None:
            yield field, option


def hyper_connection_variant(config: Any) -> str:
    """``'residual'`` or ``'<dynamic|static> <HC|Frac|mHC|mHC-lite>'`` for any (megatron-core)
    config: the one name of a configuration's variant, in checkpoints and logs."""
    if not getattr(config, USE_HC, False):
        return "residual"
    return variant_name(kind_of(config), config.hyper_connections_dynamic, config.num_fracs)


def variant_name(kind: str, dynamic: bool, num_fracs: int = 1) -> str:
    """``'<dynamic|static> <HC|Frac|mHC|mHC-lite>'``: a variant's name from its kind."""
    if kind == HC and num_fracs > 1:
        kind = "Frac"
    return f"{'dynamic' if dynamic else 'static'} {kind}"


def kind_of(config: Any) -> str:
    """The kind of the config's hyper-connections: ``HC``, ``MHC`` or ``MHC_LITE``."""
    if not getattr(config, USE_MHC):
        return HC
    return MHC_LITE if config.mhc_h_res_parameterization == "permutations" else MHC


def module_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments that the config's options give its HC or mHC modules."""
    kind = kind_of(config)
    return {
        option.module_arg: getattr(config, field.name)
        for field, option in _options(type(config))
        if option.module_arg is not None and kind in option.kinds
    }


def must_match_fields(config_class: type | None = None) -> tuple[str, ...]:
    """The options a checkpoint must agree on with the model that loads it."""
    return tuple(
        field.name
        for field, option in _options(config_class or _config_class())
        if option.must_match
    )


def check_options(config: Any) -> None:
    """Raise ``ValueError`` for an HC option of ``config`` that is out of range or has no
    effect (set without its switch, or for another variant). Called by the config."""
    options = list(_options(type(config)))
    for field, option in options:
        value = getattr(config, field.name)
        if (
            option.needs is not None
            and not getattr(config, option.needs)
            and value != field.default
        ):
            raise ValueError(
                f"{field.name}={value!r} has no effect without {option.needs}=True: set "
                f"{option.needs}=True or leave {field.name} at its default {field.default!r}"
            )
    if getattr(config, USE_HC):
        kind = kind_of(config)
        for field, option in options:
            value = getattr(config, field.name)
            if kind not in option.kinds and value != field.default:
                raise ValueError(
                    f"{field.name}={value!r} has no effect on {kind} (it is an option of "
                    f"{_words(option.kinds)}): leave {field.name} at its default "
                    f"{field.default!r}"
                )
    for field, option in options:
        value = getattr(config, field.name)
        allowed = option.allowed or _choices(field)
        if allowed is not None and not allowed(value):
            raise ValueError(f"{field.name} must be {allowed.words}, got {field.name}={value!r}")


# --------------------------------------------------------------------------------------------
# Command line


def flag_of(name: str, config_class: type | None = None) -> str:
    """The command-line flag that sets config field ``name``."""
    for field, _ in _options(config_class or _config_class()):
        if field.name == name:
            return _flag(field)
    return "--" + name.replace("_", "-")


def _flag(field: dataclasses.Field) -> str:
    names = field.metadata.get("argparse_meta", {}).get("arg_names")
    return names[0] if names else "--" + field.name.replace("_", "-")


def add_hyper_connection_arguments(
    parser: argparse.ArgumentParser, config_class: type | None = None
) -> argparse._ArgumentGroup:
    """Add a "hyper-connections" argument group with one flag per HC option.

    Each flag's destination is the config field, its default the field's default and its help
    the field's docstring. A flag that ``parser`` already defines is skipped, so this serves
    Megatron-LM's ``extra_args_provider`` as well as the package's own trainer.
    """
    config_class = config_class or _config_class()
    group = parser.add_argument_group(
        "hyper-connections", "Hyper-Connections (HC), mHC and Frac-Connections."
    )
    docs = field_docstrings(config_class)
    for field, _ in _options(config_class):
        flag = _flag(field)
        if flag in parser._option_string_actions:
            continue
        kwargs: dict[str, Any] = {"dest": field.name, "default": field.default}
        help_text = docs.get(field.name, "")
        kind = _value_type(field)
        if kind is bool:
            kwargs["action"] = "store_false" if field.default else "store_true"
            if field.default:
                help_text = f"sets {field.name}=False: {help_text}"
        elif _choices(field) is not None:
            kwargs.update(type=kind, choices=typing.get_args(field.type))
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        group.add_argument(flag, help=help_text.replace("``", "").replace("%", "%%"), **kwargs)
    return group


def hyper_connection_kwargs(args: argparse.Namespace, config_class: type | None = None) -> dict:
    """``{field: value}`` for every HC option found on parsed ``args``; None stands for a flag
    not given (argparse's usual default) and leaves the field at its default."""
    names = (field.name for field, _ in _options(config_class or _config_class()))
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _choices(field: dataclasses.Field) -> Allowed | None:
    """The values of a ``Literal`` field."""
    if typing.get_origin(field.type) is not typing.Literal:
        return None
    values = typing.get_args(field.type)
    return Allowed(" or ".join(map(repr, values)), lambda v: v in values)


def _value_type(field: dataclasses.Field) -> type:
    kind = field.type
    if typing.get_origin(kind) is typing.Literal:
        return type(typing.get_args(kind)[0])
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


@functools.cache
def field_docstrings(config_class: type) -> dict[str, str]:
    """The docstring under each field of ``config_class`` (its own fields, not inherited
    ones), joined into one line: dataclass fields keep none at run time, the source does."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(config_class)))
    (body,) = (node.body for node in tree.body if isinstance(node, ast.ClassDef))
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# --------------------------------------------------------------------------------------------
# Documentation


def options_table(config_class: type | None = None) -> str:
    """The README's table of HC options (Markdown), one row per declared option."""
    config_class = config_class or _config_class()
    docs = field_docstrings(config_class)
    rows = [
        "| option | flag | default | applies to | checkpoint | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for field, option in _options(config_class):
        applies = _words(option.kinds)
        if option.needs not in (None, USE_HC, USE_MHC):
            applies += f", with `{option.needs}`"
        meaning = _first_sentence(docs.get(field.name, ""))
        meaning = meaning.replace("``", "`").replace("|", "\\|")
        match = "must match" if option.must_match else ""
        rows.append(
            f"| `{field.name}` | `{_flag(field)}` | `{field.default!r}` | {applies} | {match} "
            f"| {meaning} |"
        )
    return "\n".join(rows) + "\n"


def _words(kinds: tuple[str, ...]) -> str:
    return " and ".join(kinds) if len(kinds) < 3 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


if __name__ == "__main__":
    print(options_table(), end="")
