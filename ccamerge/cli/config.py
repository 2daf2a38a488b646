"""Settings from a file: ``--config merge.toml`` (or ``.yaml``/``.yml``).

The file's keys are the command's flag names, with dashes or underscores
(``num-samples = 500``), plus the arguments (``checkpoints = ["a.pt", "b.pt"]``)
and, for commands that take ``--param``, a ``[params]`` table of method
parameters (the alias flags such as ``gamma`` may also stand at the top level).
The file fills the defaults the flags would (the click context's ``default_map``),
so a flag given on the command line wins; method parameters are merged key by key
in :func:`ccamerge.cli.params.method_params`. Relative paths in the file are read
from the current directory, like the flags'.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from ..runtime.errors import OptionError
from .common import EXIT_USER_ERROR, fail
from .params import ALIASES

SUFFIXES = (".toml", ".yaml", ".yml")
_NOT_KEYS = ("config", "param")  # --config itself; --param is the [params] table


@dataclass(frozen=True)
class Config:
    """What a config file holds besides the flags' defaults: its method parameters,
    key -> (where in the file, value)."""

    path: str
    params: dict[str, tuple[str, Any]] = field(default_factory=dict)


def read_config(ctx: typer.Context, value: Path | None) -> Config | None:
    """The ``--config`` callback (eager, so that it runs before the other options read
    their defaults): read the file, fill ``ctx.default_map``; one-line errors, exit 1."""
    if value is None:
        return None
    try:
        settings = read_settings(value)
        config, defaults = split_settings(ctx, settings, str(value))
    except OptionError as e:
        fail(str(e), EXIT_USER_ERROR)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return config


def read_settings(path: Path) -> dict[str, Any]:
    """The file's top-level table (TOML with the standard library, YAML with PyYAML)."""
    if path.suffix.lower() not in SUFFIXES:
        raise OptionError(f"--config {path}: expects a .toml, .yaml or .yml file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OptionError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if path.suffix.lower() == ".toml":
        try:
            settings = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise OptionError(f"--config {path}: not valid TOML ({e})") from None
    else:
        settings = _load_yaml(path, raw)
    if not isinstance(settings, dict):
        raise OptionError(f"--config {path}: expects a table of settings at the top level")
    return settings


def _load_yaml(path: Path, raw: bytes) -> Any:
    try:
        import yaml
    except ImportError:
        raise OptionError(
            f"--config {path}: reading YAML needs PyYAML: pip install ccamerge[yaml]"
        ) from None
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise OptionError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None


def split_settings(
    ctx: typer.Context, settings: dict[str, Any], path: str
) -> tuple[Config, dict[str, Any]]:
    """``(the method parameters, the default_map of the other keys)``, each value
    checked with the type of the option it sets."""
    options = keys_of(ctx)
    takes_params = any(p.name == "param" for p in ctx.command.params)
    params: dict[str, tuple[str, Any]] = {}
    defaults: dict[str, Any] = {}

    wheres: dict[str, str] = {}

    def add_param(key: str, where: str, value: Any) -> None:
        if key in wheres:
            raise OptionError(f"{path}: parameter {key} given twice ({wheres[key]} and {where})")
        wheres[key] = where
        params[key] = (f"{path}: {where}", value)

    for key, value in settings.items():
        name = str(key).replace("_", "-")
        if name == "params" and takes_params:
            if not isinstance(value, dict):
                raise OptionError(f"{path}: params expects a table (KEY = VALUE lines)")
            for pk, pv in value.items():
                add_param(str(pk).replace("-", "_"), f"params.{pk}", pv)
        elif f"--{name}" in ALIASES and name in options:
            add_param(ALIASES[f"--{name}"], str(key), value)
        elif name in options:
            if value is not None:
                defaults[options[name].name] = checked(ctx, options[name], key, value, path)
        else:
            valid = sorted([*options, *(["params"] if takes_params else [])])
            raise OptionError(f"{path}: unknown key {key!r} (valid: {', '.join(valid)})")
    return Config(path, params), defaults


def keys_of(ctx: typer.Context) -> dict[str, Any]:
    """The command's parameters by config key: an option's long flag names without the
    dashes (``num-samples``, ``refit``), an argument's name (``checkpoints``)."""
    out: dict[str, Any] = {}
    for p in ctx.command.params:
        if p.name in _NOT_KEYS:
            continue
        flags = (
            [o[2:] for o in p.opts if o.startswith("--")] if p.param_type_name == "option" else []
        )
        for name in flags or [p.name.replace("_", "-")]:
            out[name] = p
    return out


def checked(ctx: typer.Context, param: Any, key: str, value: Any, path: str) -> Any:
    """``value`` if the option ``param`` takes it (as from the command line), else an
    :class:`OptionError`."""
    many = param.multiple or param.nargs != 1
    flag = getattr(param, "is_bool_flag", False)
    if many != isinstance(value, list) or (flag != isinstance(value, bool)):
        what = "a list" if many else "true or false" if flag else "a single value"
        raise OptionError(f"{path}: {key} expects {what}, got {value!r}")
    try:
        param.process_value(ctx, value)
    except typer.BadParameter as e:
        raise OptionError(f"{path}: {key} = {value!r}: {e.message}") from None
    return value
