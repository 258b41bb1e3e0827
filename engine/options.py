"""Command-line flags and ``key=value`` arguments, generated once from the frozen configs.

Every leaf field of a config dataclass (nested configs included) has one flat name, its
field name, or the ``flag`` its metadata gives (``PolicyConfig.name`` is ``policy``):

    EngineConfig.cache.block_size   --block-size 16    block_size=16    {"block_size": 16}
    EngineConfig.policy.name        --policy lsa       policy=lsa       {"policy": "lsa"}
    EngineConfig.policy.budget      --budget 0.1       budget=0.1       {"budget": 0.1}

So a field added to a config reaches ``lsa generate``, ``lsa eval``, ``lsa serve`` and
``serve run cluster:app`` alike, with the help text and default written once, beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError

NONE_WORDS = ("none", "null", "")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    name: str  # the flat name: a key=value key, and the flag without dashes
    path: tuple[str, ...]  # attribute path from the root config, e.g. ("cache", "block_size")
    kind: type  # int, float, str, bool, tuple (of ints) or dict (of floats)
    optional: bool  # None is a value
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """A value from text (``key=value``, a flag) or from JSON/YAML, checked against the type."""
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            if self.optional:
                return None
            if value is None or self.kind is not str:
                raise InvalidRequestError(f"{self.name} needs a value ({self.kind.__name__})")
        try:
            parsed = self._parse(value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"{self.name}={value!r} is not a valid {self._kind_name()}") from exc
        if self.choices and parsed not in self.choices:
            raise InvalidRequestError(f"{self.name}={value!r}: use one of {', '.join(map(str, self.choices))}")
        return parsed

    def _parse(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError(value)
        if self.kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(str(value).strip().replace("_", "")) if isinstance(value, str) else int(value)
        if self.kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if self.kind is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(str(v).strip()) for v in items if str(v).strip())
        if self.kind is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v).strip() for v in items if str(v).strip()]
        if self.kind is dict:
            if isinstance(value, str):  # "GPU=1,kv_memory=0.5"
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                value = {k.strip(): v for k, v in pairs}
            return {str(k): float(v) for k, v in dict(value).items()}
        if not isinstance(value, str):
            raise ValueError(value)
        return value

    def _kind_name(self) -> str:
        return {tuple: "comma-separated list of integers", list: "comma-separated list",
                dict: "comma-separated list of name=number"}.get(self.kind, self.kind.__name__)


def options(cls: type) -> list[Option]:
    """The flat options of a config dataclass, nested configs flattened, in field order."""
    out: list[Option] = []
    _collect(cls, (), out)
    names = [o.name for o in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TypeError(f"{cls.__name__}: flat option names must be unique, {sorted(dup)} repeat")
    return out


def _collect(cls: type, prefix: tuple[str, ...], out: list[Option]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            _collect(hint, prefix + (f.name,), out)
            continue
        if f.name.startswith("_") or not f.init:
            continue
        kind, optional = _kind(hint)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default to be an option")
        out.append(Option(f.metadata.get("flag", f.name), prefix + (f.name,), kind, optional, default,
                          f.metadata.get("help", ""), f.metadata.get("choices")))


def _kind(hint) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0]
    origin = typing.get_origin(hint) or hint
    if origin in (int, float, str, bool, tuple, list, dict):
        return origin, optional
    raise TypeError(f"unsupported option type {hint!r}")


def build(cls: type, values: dict[str, Any], strict: bool = True):
    """A config from flat values (``{"block_size": "16", "policy": "lsa"}``); text is parsed by
    the field's type. Unknown names are an error naming the closest known one (``strict``),
    else ignored."""
    opts = {o.name: o for o in options(cls)}
    unknown = [k for k in values if k not in opts]
    if unknown and strict:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(opts), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(opts))}"
        raise InvalidRequestError(f"unknown argument {key!r}{hint}")
    tree: dict = {}
    for key, value in values.items():
        if key not in opts:
            continue
        node = tree
        opt = opts[key]
        for part in opt.path[:-1]:
            node = node.setdefault(part, {})
        node[opt.path[-1]] = opt.parse(value)
    return _instantiate(cls, tree)


def _instantiate(cls: type, tree: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        value = tree[f.name]
        kwargs[f.name] = _instantiate(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kwargs)


def flatten(config) -> dict[str, Any]:
    """The flat values of a config (the inverse of ``build``): for records and round trips."""
    out = {}
    for opt in options(type(config)):
        value = config
        for part in opt.path:
            value = getattr(value, part)
        out[opt.name] = value
    return out


def replace(config, **values):
    """A copy of ``config`` with some flat values changed (``replace(cfg, budget=0.2, block_size=16)``)."""
    return build(type(config), {**flatten(config), **values})


# ------------------------------------------------------------------ argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, once (generated flags already say theirs); not a default of
    None or False (an unset option, a switch), which says nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "(default:" in text or unset or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                  exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                  suppress: bool = False) -> None:
    """One flag per option of ``cls`` (``--block-size``...), with its help and default.
    ``defaults`` overrides a default for this command; ``suppress``: options not given stay
    out of the namespace (so one parser can carry two configs' flags)."""
    defaults = defaults or {}
    for opt in options(cls):
        if opt.name in exclude:
            continue
        default = argparse.SUPPRESS if suppress else defaults.get(opt.name, opt.default)
        shown = defaults.get(opt.name, opt.default)
        help_text = f"{opt.help} (default: {_show(shown)})" if opt.help else f"default: {_show(shown)}"
        kwargs: dict[str, Any] = {"dest": opt.name, "default": default, "help": help_text.replace("%", "%%")}
        if opt.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _argtype(opt)
            kwargs["metavar"] = opt.name.upper() if opt.kind not in (tuple, list, dict) else "A,B,..."
        parser.add_argument(opt.flag, **kwargs)


def _argtype(opt: Option):
    def parse(text: str):
        try:
            return opt.parse(text)
        except InvalidRequestError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    parse.__name__ = opt.kind.__name__
    return parse


def _show(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def from_args(args: argparse.Namespace, cls: type, **overrides):
    """The config of ``cls`` from a namespace filled by ``add_arguments`` (plus ``overrides``)."""
    names = {o.name for o in options(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return build(cls, values)


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flat values of ``cls`` that a command line gave, from flags added with
    ``add_arguments(..., suppress=True)`` (those not given are absent from ``args``)."""
    names = {o.name for o in options(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def to_argv(values: dict[str, Any], cls: type) -> list[str]:
    """Flags that rebuild ``values`` (those that differ from the defaults), for a command line
    a reader can rerun."""
    defaults = {o.name: o for o in options(cls)}
    words: list[str] = []
    for key, value in values.items():
        opt = defaults.get(key)
        if opt is None or value == opt.default:
            continue
        if opt.kind is bool:
            words.append(opt.flag if value else "--no-" + opt.flag[2:])
        else:
            words += [opt.flag, _show(value) if value is not None else "none"]
    return words


__all__ = ["HelpFormatter", "Option", "options", "build", "flatten", "replace", "add_arguments", "from_args",
           "given_values", "to_argv"]
