"""Method parameters on the command line, parsed by the methods' declarations.

``--param KEY=VALUE`` (repeatable) sets any declared parameter (``--param gamma=auto``
searches its declared candidates); the flags in :data:`ALIASES` are aliases of it; a
``--config`` file's ``[params]`` table (:mod:`ccamerge.cli.config`) sets them too, and
the command line wins over the file, key by key.

The method registry (and torch with it) loads inside the functions, when a command
runs or a help page is shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..runtime.errors import OptionError

if TYPE_CHECKING:
    from ..methods import Param

# flag -> the parameter it sets (the flags of the built-in methods, before --param)
ALIASES = {
    "--gamma": "gamma",
    "--ridge": "ridge",
    "--alpha": "alpha",
    "--beta": "beta",
    "--max-iter": "max_iter",
}


def methods_of(method: str) -> list[str]:
    """The methods a merge's parameters go to: ``method``, or the candidates of auto."""
    from ..pipeline import auto_methods

    return auto_methods() if method == "auto" else [method]


def method_params(
    methods: Sequence[str],
    pairs: Sequence[str] | None,
    aliases: Mapping[str, str | None],
    from_file: Mapping[str, tuple[str, Any]] | None = None,
) -> dict[str, Any]:
    """The parameters for ``methods``: the file's (``key -> (where, value)``), then the
    command line's (the alias flags ``aliases``, flag -> text or None, and ``pairs``,
    ``KEY=VALUE``), which win; each value parsed by the first method declaring it."""
    from ..methods import method_class

    declared: dict[str, tuple[str, Param]] = {}
    for name in methods:
        for p in method_class(name).parameters:
            declared.setdefault(p.name, (name, p))
    out = {
        key: _value(declared, methods, key, v, where)
        for key, (where, v) in (from_file or {}).items()
    }
    sources: dict[str, str] = {}
    for source, key, text in _command_line(pairs or (), aliases):
        if key in sources:
            raise OptionError(f"parameter {key} given twice ({sources[key]} and {source})")
        sources[key] = source
        out[key] = _value(declared, methods, key, text, source)
    return out


def _command_line(
    pairs: Sequence[str], aliases: Mapping[str, str | None]
) -> Iterator[tuple[str, str, str]]:
    """``(source, key, text)`` of every parameter the command line gives."""
    for flag, text in aliases.items():
        if text is not None:
            yield flag, ALIASES[flag], text
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise OptionError(f"--param expects KEY=VALUE, got {pair!r}")
        yield f"--param {key}", key, text.strip()


def _value(
    declared: Mapping[str, tuple[str, Param]],
    methods: Sequence[str],
    key: str,
    value: Any,
    source: str,
) -> Any:
    """``value`` (command-line text, or a config file's value) as parameter ``key``."""
    from ..methods import method_parameters
    from ..methods.base import describe_names

    if key not in declared:
        if len(methods) == 1:
            raise OptionError(
                f"{source}: method {methods[0]!r} takes no parameter {key} "
                f"(its parameters: {describe_names(method_parameters(methods[0]))})"
            )
        known = "; ".join(f"{m}: {describe_names(method_parameters(m))}" for m in methods)
        raise OptionError(f"{source}: none of {', '.join(methods)} takes {key} ({known})")
    name, param = declared[key]
    try:
        return param.parse(value) if isinstance(value, str) else param.convert(value)
    except ValueError as e:
        known = describe_names(method_parameters(name))
        suffix = "" if source in ALIASES else f" (parameters of {name!r}: {known})"
        raise OptionError(f"{source} {e}{suffix}") from None


def describe_default(p: Param) -> str:
    """A parameter's default in words: the method's own, or a merge's where it declares
    one ("1.0 with the refit, auto without; 0.1 in barrier")."""
    if p.default_with_refit is None and p.default_without_refit is None:
        return f"{p.default}"
    with_refit = p.default if p.default_with_refit is None else p.default_with_refit
    without = p.default if p.default_without_refit is None else p.default_without_refit
    return f"{with_refit} with the refit, {without} without; {p.default} in barrier"


def alias_help(flag: str, method: str) -> str:
    """The help of an alias flag, from the declaration of the parameter it sets."""
    from ..methods import method_class

    key = ALIASES[flag]
    (p,) = [p for p in method_class(method).parameters if p.name == key]
    limits = f", {p.limits()}" if p.limits() else ""
    return (
        f"{method}: {p.help} ({p.kind()}{limits}; default {describe_default(p)}). "
        f"Alias of --param {key}=VALUE."
    )


def param_help() -> str:
    """The help of --param: every registered method's parameters."""
    from ..methods import list_methods, method_parameters

    listed = "; ".join(
        f"{m}: {', '.join(method_parameters(m))}" for m in list_methods() if method_parameters(m)
    )
    return (
        "A method parameter KEY=VALUE, repeatable; VALUE auto searches the candidates the "
        f"parameter declares. Parameters: {listed} (docs/methods.md)."
    )


def method_help() -> str:
    """The help of merge's --method: the registered methods."""
    from ..methods import list_methods

    return f"{', '.join(list_methods())} or auto (default cca); see docs/methods.md."
