"""Typed experiment configs: nested dataclasses loaded from YAML and overridden from the command line.

A config is a tree of dataclasses with typed fields and defaults (nanoGPT-style typed defaults,
timm's saved ``args.yaml``)::

    @dataclass
    class TrainConfig:
        lr: float = 0.1  # peak learning rate
        epochs: int = 10  # number of training epochs

    @dataclass
    class ExperimentConfig:
        train: TrainConfig = field(default_factory=TrainConfig)  # optimisation settings

    cfg = load_config(ExperimentConfig, "configs/exp.yaml", overrides=["train.lr=1e-3"])

Loading is strict: an unknown key, or a value of the wrong type, raises ``ValueError`` naming the
dotted key path (``train.lr``), the rule and the value received. Missing keys keep their defaults.

Two optional hooks of a config dataclass:

* ``__config_renamed__ = {"old": "new.path"}`` (a plain class attribute, not a field): a file or
  override that still uses ``old`` gets "key 'model.old' was renamed: use 'model.new.path'".
* ``def __config_check__(self, where: str, path: str) -> None``: called after the section is built from
  a mapping (``where`` is the file, ``path`` the section's dotted key), for rules that need more than
  types (e.g. ``model.kwargs`` against the constructor's signature); it raises ``ValueError``.

Supported field types: ``bool`` (only ``true``/``false``), ``int`` (not ``bool``), ``float``
(``int`` accepted, and numeric strings such as ``"1e-3"``, which YAML 1.1 reads as strings),
``str``, ``pathlib.Path`` (from a string), ``Optional[X]`` and other unions, ``Literal[...]``,
``list[X]``, ``tuple[X, ...]``, fixed tuples ``tuple[X, Y]`` (YAML gives lists), ``dict[str, X]``,
nested dataclasses and ``typing.Any`` (accepted unchecked).

This module does not import torch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import secrets
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
    "add_config_arguments",
    "config_from_args",
]

T = TypeVar("T")

_MISSING = dataclasses.MISSING


# --------------------------------------------------------------------------------------------
# Type helpers
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """Human-readable name of a type annotation (``int``, ``list[int]``, ``Optional[str]``)."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1 and len(args) == 2:
            return f"Optional[{_type_name(non_none[0])}]"
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if args:
            return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
        return name
    return str(tp).replace("typing.", "")


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (handles ``from __future__ import annotations``)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as err:  # an annotation names something that is not importable from its module
        raise TypeError(f"cannot resolve the type annotations of {cls.__name__}: {err}") from err
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _wrong_type(where: str, path: str, tp: Any, value: Any) -> ValueError:
    return ValueError(
        f"{where}: key '{path}' expects {_type_name(tp)}, got {value!r} "
        f"(type {type(value).__name__})"
    )


def _parse_float_string(value: str) -> float | None:
    """``float(value)`` for a numeric string such as ``"1e-3"`` (YAML 1.1 reads these as strings)."""
    text = value.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _convert(tp: Any, value: Any, path: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (dataclasses, tuples)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _wrong_type(where, path, tp, value)
        return _from_mapping(tp, value, path, where, base=None)

    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong_type(where, path, tp, value)
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path, where)
            except ValueError as err:
                errors.append(err)
        # Keep a single option's error when it is deeper (an unknown nested key, a list element);
        # an error about this very key is restated with the full type (Optional[str], not str).
        if len(errors) == 1 and f"key '{path}' expects" not in str(errors[0]):
            raise errors[0]
        raise _wrong_type(where, path, tp, value)

    if origin is Literal:
        for option in args:
            # type check too: True == 1 and 1 == 1.0 must not match across types
            if type(value) is type(option) and value == option:
                return value
        raise ValueError(
            f"{where}: key '{path}' must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(where, path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong_type(where, path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            parsed = _parse_float_string(value)
            if parsed is not None:
                return parsed
        raise _wrong_type(where, path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(where, path, tp, value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, os.PathLike)):
            return tp(value)
        raise _wrong_type(where, path, tp, value)

    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(where, path, tp, value)
        if origin is None or not args:  # bare list / tuple: unchecked elements
            return list(value) if (origin or tp) is list else tuple(value)
        if origin is list:
            return [_convert(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(
                f"{where}: key '{path}' expects {_type_name(tp)} with exactly {len(args)} "
                f"elements, got {len(value)}: {value!r}"
            )
        return tuple(_convert(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))

    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(where, path, tp, value)
        if origin is None or not args:
            return dict(value)
        key_tp, val_tp = args
        out = {}
        for k, v in value.items():
            _convert(key_tp, k, f"{path} (key {k!r})", where)
            out[k] = _convert(val_tp, v, _join(path, str(k)), where)
        return out

    raise TypeError(f"{where}: key '{path}' has an unsupported annotation {_type_name(tp)}")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _from_mapping(cls: type, data: Mapping, path: str, where: str, base: Any) -> Any:
    """Build ``cls`` from ``data``; fields not in ``data`` come from ``base`` or the field defaults."""
    ftypes = _field_types(cls)
    unknown = [k for k in data if k not in ftypes]
    if unknown:
        renamed = _renamed_message(cls, path, str(unknown[0]))
        if renamed:
            raise ValueError(f"{where}: {renamed}")
        scope = f"'{path}'" if path else "the top level"
        raise ValueError(
            f"{where}: unknown key '{_join(path, str(unknown[0]))}'; valid keys at {scope} are: "
            f"{', '.join(ftypes)}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = ftypes[f.name]
        default = getattr(base, f.name) if base is not None else _default_of(f)
        key_path = _join(path, f.name)
        if f.name not in data:
            if default is _MISSING:
                raise ValueError(f"{where}: missing required key '{key_path}' ({_type_name(tp)})")
            continue  # the dataclass fills its own default (fresh default_factory object)
        value = data[f.name]
        # A partial mapping for a nested dataclass is merged over that field's default instance,
        # so `model: {depth: 4}` keeps every other model setting (including non-trivial defaults).
        nested_tp = tp
        if typing.get_origin(tp) in (Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            nested_tp = options[0] if len(options) == 1 else None
        if _is_dataclass_type(nested_tp) and isinstance(value, Mapping) and isinstance(default, nested_tp):
            kwargs[f.name] = _from_mapping(nested_tp, value, key_path, where, base=default)
        else:
            kwargs[f.name] = _convert(tp, value, key_path, where)
    obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    check = getattr(obj, "__config_check__", None)
    if check is not None:
        check(where, path)
    return obj


def _renamed_message(cls: type, path: str, key: str) -> str | None:
    """"key 'a.old' was renamed: use 'a.new'" when ``cls.__config_renamed__`` maps ``key``."""
    new = getattr(cls, "__config_renamed__", {}).get(key)
    if new is None:
        return None
    return f"key '{_join(path, key)}' was renamed: use '{_join(path, new)}'"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "config") -> T:
    """Build a config dataclass from a (YAML-like) mapping, strictly.

    Args:
        cls: The config dataclass.
        data: Mapping of field names to values; nested mappings fill nested dataclasses. Missing
            keys keep their defaults. ``None`` means "all defaults".
        where: Prefix of error messages, e.g. the YAML file name. Default ``"config"``.

    Returns:
        An instance of ``cls``.

    Raises:
        ValueError: On an unknown key (the message names the dotted path and lists the valid keys),
            a value of the wrong type (names the key, the expected type and the value received),
            or a missing required field.
        TypeError: If ``cls`` is not a dataclass or uses an unsupported annotation.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    return _from_mapping(cls, data, "", where, base=None)


def _plain(value: Any) -> Any:
    """Convert a config value to plain YAML-safe Python (dicts, lists, str, numbers, None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, paths strings): YAML- and torch-safe.

    ``from_dict(type(cfg), to_dict(cfg)) == cfg`` holds for every supported field type.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _resolve_path_type(cls: type, keys: list[str], override: str) -> Any:
    """Annotation at the dotted ``keys`` inside ``cls``; ValueError naming the path if absent."""
    tp: Any = cls
    walked: list[str] = []
    for key in keys:
        # Look through Optional[...] to the single non-None option.
        if typing.get_origin(tp) in (Union, types.UnionType):
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(options) == 1:
                tp = options[0]
        if _is_dataclass_type(tp):
            ftypes = _field_types(tp)
            if key not in ftypes:
                renamed = _renamed_message(tp, ".".join(walked), key)
                if renamed:
                    raise ValueError(f"override '{override}': {renamed}")
                scope = f"'{'.'.join(walked)}'" if walked else "the top level"
                raise ValueError(
                    f"override '{override}': unknown key '{'.'.join(walked + [key])}'; valid keys at "
                    f"{scope} are: {', '.join(ftypes)}"
                )
            tp = ftypes[key]
        elif typing.get_origin(tp) is dict or tp is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        elif tp is Any:
            pass
        else:
            raise ValueError(
                f"override '{override}': key '{'.'.join(walked)}' is a {_type_name(tp)}, it has no "
                f"sub-key '{key}'"
            )
        walked.append(key)
    return tp


def _dict_default(cls: type, keys: list[str], override: str) -> dict | None:
    """The default value at ``keys`` of ``cls`` when the field there is a dict (not a dataclass), else None."""
    tp = _resolve_path_type(cls, keys, override)
    if not (typing.get_origin(tp) is dict or tp is dict):
        return None
    value: Any = _MISSING
    for i, key in enumerate(keys):
        if i == 0:
            f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
            value = _default_of(f) if f is not None else _MISSING
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = getattr(value, key, _MISSING)
        elif isinstance(value, Mapping):
            value = value.get(key, _MISSING)
        else:
            return None
        if value is _MISSING:
            return None
    return _plain(value) if isinstance(value, Mapping) else None


def _deep_merge(dst: dict, src: Mapping) -> dict:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], cls: type | None = None
) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested dict, in place, and return it.

    Each value is parsed with ``yaml.safe_load`` (``lr=0.01``, ``channels=[8,16]``, ``flag=true``,
    ``ckpt=null``). A mapping value is merged into an existing mapping at that key, except where
    ``cls`` types the key as a dict (not a config section): there it replaces the mapping, so
    ``model.kwargs={channels: [8, 16]}`` gives exactly these keyword arguments, while
    ``model.kwargs.K=0.5`` changes one entry of the mapping in ``data`` (or of the field's default).

    Args:
        data: Nested dict (e.g. a loaded YAML file); intermediate dicts are created as needed.
        overrides: Strings of the form ``a.b.c=value``.
        cls: The config dataclass. When given, every key path is checked against it (an unknown
            path raises ``ValueError`` naming it) and the target type guides parsing: a value YAML
            would read as another type is kept as the raw string where the field is a string
            (``name=001`` stays ``"001"``), and numeric strings become floats where the field is a
            float (``lr=1e-3``, which YAML 1.1 reads as a string). Without ``cls`` the values are
            stored as parsed and checked later by :func:`from_dict`.

    Raises:
        ValueError: On a malformed override (no ``=``, empty key segment), an unknown key path,
            or a value YAML cannot parse.
    """
    for override in overrides:
        if not isinstance(override, str) or "=" not in override:
            raise ValueError(f"override {override!r} must have the form KEY=VALUE, e.g. train.lr=0.01")
        key, raw = override.split("=", 1)
        keys = key.strip().split(".")
        if any(not k for k in keys):
            raise ValueError(f"override {override!r}: key {key!r} has an empty segment")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {override!r}: cannot parse value {raw!r} as YAML: {err}") from err

        replace = False
        if cls is not None:
            tp = _resolve_path_type(cls, keys, override)
            replace = typing.get_origin(tp) is dict or tp is dict
            try:
                value = _convert_for_override(tp, value, key)
            except ValueError:
                # YAML may have read e.g. "001" as 1 or "yes" as True: the raw string may fit.
                try:
                    _convert(tp, raw, key, "override")
                    value = raw
                except ValueError:
                    pass  # keep the parsed value: from_dict reports the type error with the key

        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                # a dict-typed field (not a config section) is replaced whole by from_dict: start from its
                # default so that `model.kwargs.K=0.5` changes one entry of the default kwargs
                seed = _dict_default(cls, keys[: i + 1], override) if cls is not None else None
                child = node[k] = copy.deepcopy(seed) if seed is not None else {}
            elif not isinstance(child, dict):
                raise ValueError(
                    f"override {override!r}: '{'.'.join(keys[: i + 1])}' is {child!r}, not a mapping"
                )
            node = child
        last = keys[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict) and not replace:
            _deep_merge(node[last], value)
        else:
            node[last] = value
    return data


def _convert_for_override(tp: Any, value: Any, key: str) -> Any:
    """Validate an override value against its field type; return it in plain (YAML) form."""
    _convert(tp, value, key, "override")
    if tp is float or (
        typing.get_origin(tp) in (Union, types.UnionType) and float in typing.get_args(tp)
    ):
        if isinstance(value, str):
            parsed = _parse_float_string(value)
            if parsed is not None:
                return parsed
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path}: invalid YAML: {err}") from err
    if data is None:  # empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    return data


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()
) -> T:
    """Load a config: defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    Args:
        cls: The config dataclass.
        path: YAML file; ``None`` uses the defaults only.
        overrides: ``key.path=value`` strings (see :func:`apply_overrides`).

    Raises:
        FileNotFoundError: If ``path`` does not exist (names the path).
        ValueError: On invalid YAML or a top level that is not a mapping (names the file), or on an
            unknown key / wrong type (names the key; the message starts with the file name).
    """
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        where = f"config file {path}"
    overrides = list(overrides)
    if overrides:
        apply_overrides(data, overrides, cls)
        where = f"{where} (with overrides {overrides})"
    return from_dict(cls, data, where=where)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (temp file in the same folder + ``os.replace``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    # Temp file next to the target (os.replace is atomic within a filesystem), mode 0o666 & ~umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def add_config_arguments(
    parser: argparse.ArgumentParser, default_config: str | os.PathLike | None = None
) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE`` to an argparse parser.

    Args:
        parser: The parser to extend (returned for chaining).
        default_config: Value of ``--config`` when it is not given (``None``: defaults only).
    """
    parser.add_argument(
        "--config",
        default=None if default_config is None else os.fspath(default_config),
        metavar="PATH",
        help="YAML config file merged over the defaults"
        + (f" (default: {default_config})" if default_config is not None else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.lr=1e-3 --set model.kwargs.K=0.5; "
        "repeatable, applied after the file",
    )
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Load ``cls`` from the ``--config``/``--set`` arguments added by :func:`add_config_arguments`."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or ())
