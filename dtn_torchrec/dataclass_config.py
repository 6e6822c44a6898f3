"""Dataclasses from nested dicts (YAML), with type checking, and ``dotted.key=value`` overrides.

Used for every config of the project (``dtn-train``'s run config, the model config); any
dataclass tree works::

    raw = apply_overrides(yaml.safe_load(text), ["train.epochs=3", "data.shuffle=false"])
    cfg = dataclass_from_dict(MyConfig, raw)     # ConfigError naming the dotted key on bad input
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Dict, List, Literal, Mapping, Sequence, Tuple, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A run config (file or override) that cannot be used; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts it (dicts -> dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return dataclass_from_dict(tp, value, key)
    if origin in (list, List, Sequence, typing.Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_convert(k, k_tp, f"{key} key"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        # YAML 1.1 reads exponent-only numbers such as 1e-3 as strings.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def dataclass_from_dict(cls: Type[T], data: Any, key: str = "") -> T:
    """Builds dataclass ``cls`` from a mapping, recursively, checking every value's type.

    Supported annotations: int, float (ints accepted), str, bool, Any, Optional/Union, Literal,
    List, Tuple, Dict and nested dataclasses. Missing keys take the dataclass defaults.

    Raises:
        ConfigError: unknown key (with the closest known key), missing required key, or a value
            of the wrong type; the message starts with the dotted key.
    """
    where = key or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = str(unknown[0])
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f"; did you mean {_join(key, close[0])!r}?" if close else ""
        raise ConfigError(
            f"{_join(key, name)}: unknown key{hint} (known keys of {where}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(message if not key or message.startswith(key) else f"{key}: {message}") from e


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.epochs=3"`` -> ``(["train", "epochs"], 3)``; the value is read as YAML."""
    dotted, sep, raw = text.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Returns a copy of the nested dict ``raw`` with each ``dotted.key=value`` applied in order."""
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section"
                )
            node = child
        node[parts[-1]] = value
    return result

