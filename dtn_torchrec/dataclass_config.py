"""Dataclasses from nested dicts (YAML), with type checking, and ``dotted.key=value`` overrides.

Used for every config of the project (``dtn-train``'s run config, the model config); any
dataclass tree works::

    raw = apply_overrides(yaml.safe_load(text), ["train.epochs=3", "model.dtn.methods.0.num_hash=3"])
    cfg = dataclass_from_dict(MyConfig, raw)     # ConfigError naming the dotted key on bad input
    echo = config_to_dict(cfg)                   # loads back to an equal config

A family of config dataclasses chosen by a tag (a tagged union) is a :class:`ConfigRegistry`;
a field or list item annotated with the family's base class accepts any registered member.

Validation has one style: ``__post_init__`` raises ``ValueError``; a message that starts with
one of the class's field names (``"num_experts: must be >= 1"``) gets the full dotted key
prepended by the loader (``model.mmoe.num_experts: must be >= 1``), any other message the key of
the section.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A run config (file or override) that cannot be used; the message names the key."""


class ConfigRegistry(Generic[T]):
    """A tagged union: config dataclasses of one family, each registered under a name.

    Two layouts of the mapping, fixed per family:

    * inline (``section=False``): the tag is a key of the member's own mapping,
      ``{kind: gdcn, num_cross_layers: 3}``;
    * section (``section=True``): the tag is a key of the parent and the member's settings sit
      under the key named by its value, ``{name: dtn, dtn: {variant: paper}}``; a section of
      another member is an error (it would be ignored).

    The registry attaches itself to ``base``; the loader recognises a field, list item or dict
    value annotated with ``base`` and picks the member by the tag. Each member gets the class
    attribute ``<tag> = name`` (declare it as ``ClassVar[str]`` on ``base``).

    Args:
        base (Type[T]): the family's base class (annotations use it).
        family (str): what the members are, for messages (``"expert"``, ``"architecture"``).
        tag (str): the key holding the member name (``"kind"``, ``"name"``).
        section (bool): the section layout instead of the inline one.
    """

    def __init__(self, base: Type[T], family: str, tag: str, *, section: bool = False) -> None:
        if "__config_registry__" in base.__dict__:
            raise ValueError(f"{base.__name__} already has a config registry")
        self.base = base
        self.family = family
        self.tag = tag
        self.section = section
        self._members: Dict[str, Type[T]] = {}
        setattr(base, "__config_registry__", self)

    def register(self, name: str) -> Callable[[Type[T]], Type[T]]:
        """Class decorator: ``@EXPERTS.register("gdcn")`` on a dataclass subclass of ``base``."""

        def add(cls: Type[T]) -> Type[T]:
            if not (dataclasses.is_dataclass(cls) and issubclass(cls, self.base)):
                raise TypeError(
                    f"{cls.__name__} must be a dataclass subclass of {self.base.__name__}"
                )
            if name in self._members:
                raise ValueError(f"{self.family} {name!r} is already registered")
            setattr(cls, self.tag, name)
            self._members[name] = cls
            return cls

        return add

    def names(self) -> List[str]:
        """Registered names, in registration order."""
        return list(self._members)

    def get(self, name: Any, key: str) -> Type[T]:
        """The member registered as ``name``; ``key`` (the tag's dotted key) names it in errors."""
        if not isinstance(name, str) or name not in self._members:
            raise ConfigError(f"{key}: {name!r} is not one of {self.names()}")
        return self._members[name]

    def name_of(self, cls: type) -> str:
        """The name ``cls`` is registered under."""
        for name, member in self._members.items():
            if member is cls:
                return name
        raise KeyError(f"{cls.__name__} is not a registered {self.family}")


def _registry_of(tp: Any) -> Optional[ConfigRegistry]:
    """The registry whose base is exactly ``tp`` (members inherit the attribute: not them)."""
    return tp.__dict__.get("__config_registry__") if isinstance(tp, type) else None


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
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    registry = _registry_of(tp)
    if registry is not None and not registry.section:
        return _member_from_dict(registry, value, key)
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
        return {
            _convert(k, k_tp, f"{key} key"): _convert(v, v_tp, f"{key}.{k}")
            for k, v in value.items()
        }
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
    List, Tuple, Dict, nested dataclasses and the base class of a :class:`ConfigRegistry`.
    Missing keys take the dataclass defaults.

    Raises:
        ConfigError: unknown key (with the closest known key), missing required key, or a value
            of the wrong type; the message starts with the dotted key.
    """
    return _from_dict(cls, data, key, owner=None)


def _member_from_dict(registry: ConfigRegistry, value: Any, key: str) -> Any:
    """An inline tagged-union member: ``{tag: name, **fields}``."""
    if isinstance(value, registry.base):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {value!r}")
    tag_key = _join(key, registry.tag)
    if registry.tag not in value:
        raise ConfigError(f"{tag_key}: required key is missing (one of {registry.names()})")
    name = value[registry.tag]
    member = registry.get(name, tag_key)
    fields = {k: v for k, v in value.items() if k != registry.tag}
    return _from_dict(member, fields, key, owner=f"the {name} {registry.family}", tag=registry.tag)


def _from_dict(
    cls: Type[T], data: Any, key: str, owner: Optional[str], tag: Optional[str] = None
) -> T:
    where = key or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    sections = {
        name: registry
        for name in fields
        if (registry := _registry_of(hints[name])) is not None and registry.section
    }
    known = [k for k in fields if k not in sections]
    for registry in sections.values():
        known += [registry.tag] + registry.names()
    unknown = [k for k in data if k not in known]
    if unknown:
        name = str(unknown[0])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {_join(key, close[0])!r}?" if close else ""
        listed = ", ".join(([tag] if tag else []) + known)
        if owner:
            raise ConfigError(
                f"{_join(key, name)}: not a field of {owner}{hint} (fields: {listed})"
            )
        raise ConfigError(
            f"{_join(key, name)}: unknown key{hint} (known keys of {where}: {listed})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in sections:
            member = _section_from_dict(sections[name], data, key, f)
            if member is not None:
                kwargs[name] = member
        elif name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(key, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        first = message.split(":", 1)[0]
        if first in fields and ":" in message:
            raise ConfigError(_join(key, message)) from e
        raise ConfigError(
            message if not key or message.startswith(key) else f"{key}: {message}"
        ) from e


def _section_from_dict(
    registry: ConfigRegistry, data: Dict[str, Any], key: str, f: dataclasses.Field
) -> Any:
    """The section-layout member of ``data``: ``{tag: name, name: {...}}``; None = the default."""
    tag_key = _join(key, registry.tag)
    if registry.tag in data:
        name = data[registry.tag]
    elif f.default_factory is not dataclasses.MISSING:
        name = registry.name_of(type(f.default_factory()))
    elif f.default is not dataclasses.MISSING:
        name = registry.name_of(type(f.default))
    else:
        raise ConfigError(f"{tag_key}: required key is missing (one of {registry.names()})")
    member = registry.get(name, tag_key)
    for other in registry.names():
        # A null section is no section: an override can drop one (``model.dtn=null``).
        if other != name and data.get(other) is not None:
            raise ConfigError(
                f"{_join(key, other)}: settings of the {other!r} {registry.family}, but {tag_key} "
                f"is {name!r}; they would be ignored: remove {_join(key, other)} (override "
                f"{_join(key, other)}=null) or set {tag_key}={other} (each {registry.family} "
                "reads only its own section)"
            )
    if registry.tag not in data and name not in data:
        return None
    return _from_dict(
        member, data.get(name, {}), _join(key, name), owner=f"the {name} {registry.family}"
    )


def config_to_dict(cfg: Any) -> Any:
    """A config as plain nested dicts/lists that :func:`dataclass_from_dict` loads back.

    Tagged-union members carry their tag (``kind: gdcn``; ``name: dtn`` with a ``dtn:`` section).
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out: Dict[str, Any] = {}
        registry = getattr(type(cfg), "__config_registry__", None)
        if registry is not None and not registry.section:
            out[registry.tag] = registry.name_of(type(cfg))
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            section = _registry_of(hints[f.name])
            if section is not None and section.section:
                name = section.name_of(type(value))
                out[section.tag] = name
                out[name] = config_to_dict(value)
            else:
                out[f.name] = config_to_dict(value)
        return out
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ``methods[0]`` in an override is ``methods.0``.
_LIST_INDEX = re.compile(r"\[([^\]]*)\]")


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``"train.epochs=3"`` -> ``(["train", "epochs"], 3)``; the value is read as YAML.

    List items are addressed by index: ``model.dtn.methods.0.num_buckets=3`` or
    ``model.dtn.methods[0].num_buckets=3`` (both give ``[..., "methods", "0", "num_buckets"]``).
    """
    dotted, sep, raw = text.partition("=")
    parts = _LIST_INDEX.sub(r".\1", dotted.strip()).split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Returns a copy of the nested dict ``raw`` with each ``dotted.key=value`` applied in order.

    Missing sections are created; a list in the file is indexed by a number in ``0 .. len-1``.

    Raises:
        ConfigError: a key below a plain value, or a bad list index; names the dotted key.
    """
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result
        for depth in range(len(parts)):
            slot = _slot(node, parts, depth, text)
            if depth == len(parts) - 1:
                node[slot] = value
                break
            child = node[slot] if isinstance(node, list) else node.get(slot)
            if child is None:
                if parts[depth + 1].isdigit():
                    raise ConfigError(
                        f"{_dotted(parts[: depth + 1])}: not in the config, so its items cannot be "
                        f"addressed; set the whole list instead (override {text!r})"
                    )
                child = node[slot] = {}
            node = child
    return result


def _slot(node: Any, parts: List[str], depth: int, text: str) -> Any:
    """The dict key or list index that ``parts[depth]`` addresses in ``node``."""
    part, where = parts[depth], _dotted(parts[:depth])
    if isinstance(node, dict):
        return part
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return int(part)
        indices = f"indices 0..{len(node) - 1}" if node else "empty"
        raise ConfigError(
            f"{_dotted(parts[: depth + 1])}: no item {part!r} in {where}, a list of {len(node)} "
            f"({indices}; override {text!r})"
        )
    raise ConfigError(f"override {text!r}: {where} is {node!r}, not a section")


def _dotted(parts: Sequence[str]) -> str:
    return ".".join(parts) or "config"


def check_one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """``__post_init__`` helper: ``ValueError("name: must be one of [...]")``."""
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def check_at_least(name: str, value: float, minimum: float) -> None:
    """``__post_init__`` helper: ``ValueError("name: must be >= minimum")``."""
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def check_widths(name: str, widths: Sequence[int], non_empty: bool = False) -> None:
    """``__post_init__`` helper: layer widths are positive (and at least one if ``non_empty``)."""
    if any(w < 1 for w in widths) or (non_empty and not widths):
        need = "a non-empty list of" if non_empty else "a list of"
        raise ValueError(f"{name}: must be {need} positive widths, got {list(widths)}")
