"""YAML in, a checked Config out: `load_config(path, overrides)`.

Every key is matched against the schema's dataclasses (config.py) and converted to its annotated type; an unknown key
is refused by name with the closest known one, a wrong type names its key path. `key=value` overrides from the
command line are applied to the YAML first. The result then passes config_checks.validate.
"""

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Optional, Union

import yaml

from smollm2.config import Config
from smollm2.config_checks import validate
from smollm2.errors import ConfigError

_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
# keys this repository once had, and where their meaning lives now
MOVED = {"run.val_batches": "tokens.limit_val_batches (nanotron's key: micro-batches per validation, 0 = none)",
         "run.selective_recompute": "run.recompute: auto (the default), none (was false), selective (was true) or full"}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return "mapping" if dataclasses.is_dataclass(tp) else tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "null")


def _convert(value: Any, tp, path: str):
    """Check `value` against the annotation `tp` and build dataclasses; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        sections = [option for option in typing.get_args(tp) if dataclasses.is_dataclass(option)]
        if isinstance(value, dict) and len(sections) == 1:   # an optional section: its own errors name the key
            return _build(sections[0], value, path)
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            key_tp, val_tp = typing.get_args(tp) or (Any, Any)
            return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    elif tp is Any:
        return value
    elif tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)   # YAML 1.1 (PyYAML) reads 1e-4, with no dot, as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):   # YAML's .nan and .inf: no key here means anything by them
                raise ConfigError(f"{path}: expected a finite number, got {value}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, path: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if where in MOVED:
            raise ConfigError(f"{where}: this key moved to {MOVED[where]}")
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value, e.g. tokens.micro_batch_size=4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` strings (values parsed as YAML) into the nested dict; list items by index (`data_stages.0`)."""
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override '{text}': '{key}' is not an index of {'.'.join(keys[:i])}")
                key = int(key)
            elif not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {'.'.join(keys[:i])} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections at the top level, got {type(data).__name__}")
    return validate(_build(Config, data, ""))


def load_config(path: str, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML config, apply `key=value` overrides, check everything."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config names a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
