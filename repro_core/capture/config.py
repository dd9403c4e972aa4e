"""Turn any experiment configuration into a JSON-safe dict with a stable digest.

Accepted: dicts (incl. Lightning's ``AttributeDict`` hparams), dataclasses,
``argparse.Namespace``, pydantic models (v2 ``model_dump``; v1 ``dict``), OmegaConf/Hydra
``DictConfig``/``ListConfig`` (resolved), transformers ``PretrainedConfig`` (``to_dict``), and
any nesting of them. Leaves are converted explicitly, never dropped:

==========================  =================================================================
``Path``                    ``str``
``Enum``                    its value
numpy scalar                Python number (``item()``)
NaN / inf / -inf            ``"nan"`` / ``"inf"`` / ``"-inf"`` (JSON has no such numbers)
tensor / ndarray            ``{"__tensor__": {"shape", "dtype"}}`` / ``{"__ndarray__": …}``;
                            ``values`` too when at most 16 elements (e.g. Adam ``betas``)
set / frozenset             sorted list;  tuple → list
non-str key                 ``str`` key (``True`` → ``"true"``, ``None`` → ``"null"``);
                            two keys colliding is a ``SerializationError``, never a silent loss
anything else               ``{"__object__": {"type": "mod.Qual", "repr": "…"}}`` with memory
                            addresses removed (so the digest is stable across processes)
==========================  =================================================================

Secret-looking keys (see :mod:`.redact`) have their value replaced by ``"<redacted>"`` unless
it is a number, bool or None — hyper-parameters like ``num_key_value_heads=8`` are not
credentials, and hiding them would make the config useless; strings, containers and objects
under such keys are redacted (numbers too under a key the user denied). Every string, keys
included, is also scrubbed as text (URL credentials, ``password: …``, JWTs, …): the same
:class:`~.redact.Redactor` as :func:`~.scrub.scrub`, so both give the same result.

numpy and torch are never imported here: a value can only be an ndarray or a tensor if its
module is already in ``sys.modules``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import json
import math
import re
import sys
import uuid
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

from ..errors import SerializationError
from .environment import capture_environment
from .redact import DENIED, REDACTED, SECRET, Redactor
from .validate import validate_environment

__all__ = ["ConfigCapture", "capture_config"]

_MAX_DEPTH = 200
_MAX_REPR = 1000
_MAX_VALUES = 16
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MISSING = object()


def capture_config(
    config: Any,
    *,
    redact_allow: list[str] | None = None,
    redact_deny: list[str] | None = None,
) -> dict[str, Any]:
    """``config`` as a JSON-safe dict (``{}`` for None; ``{"value": …}`` if not a mapping).

    ``canonical_json(capture_config(cfg))`` is the same bytes whatever the key order.
    """
    converted = _Converter(Redactor.from_settings(redact_allow, redact_deny)).convert(
        config, "config", 0
    )
    if converted is None:
        return {}
    return converted if isinstance(converted, dict) else {"value": converted}


class _Converter:
    """One conversion pass; remembers the containers on the current path to stop cycles."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.active: set[int] = set()

    def convert(self, value: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise SerializationError(f"{path} is nested more than {_MAX_DEPTH} deep", path=path)
        if isinstance(value, Enum):
            return self.convert(value.value, path, depth + 1)
        scalar = self._scalar(value)
        if scalar is not _MISSING:
            return scalar
        plain = _unwrap(value)
        if plain is not _MISSING:
            return self._container(value, plain, path, depth)
        return self._leaf(value, path, depth)

    def _scalar(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, float):
            return _float(value)
        if isinstance(value, str):
            return self.redactor.text(str(value))
        return _MISSING

    def _container(self, original: Any, plain: Any, path: str, depth: int) -> Any:
        if id(original) in self.active:
            return {"__object__": {"type": _type_name(original), "repr": "<cycle>"}}
        self.active.add(id(original))
        try:
            if isinstance(plain, Mapping):
                return self._mapping(plain, path, depth)
            items = [self.convert(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(plain)]
            if isinstance(plain, (set, frozenset)):
                items.sort(key=lambda v: json.dumps(v, sort_keys=True))
            return items
        finally:
            self.active.discard(id(original))

    def _mapping(self, mapping: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            raw = _key(key)
            verdict, name = self.redactor.classify(raw), self.redactor.text(raw)
            where = f"{path}[{name!r}]"
            if name in out:
                raise SerializationError(
                    f"{path} has keys {self.redactor.text(repr(key))} and {name!r}, which are "
                    "the same JSON key; rename one of them",
                    path=where,
                )
            converted = self.convert(value, where, depth + 1)
            if verdict == DENIED or (verdict == SECRET and not _is_number(converted)):
                converted = REDACTED
            out[name] = converted
        return out

    def _leaf(self, value: Any, path: str, depth: int) -> Any:
        np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            return {"__tensor__": self._array(value, str(value.dtype).removeprefix("torch."))}
        if np is not None and isinstance(value, np.ndarray):
            return {"__ndarray__": self._array(value, str(value.dtype))}
        if np is not None and isinstance(value, np.generic):
            return self.convert(value.item(), path, depth + 1)
        if isinstance(value, (PurePath, uuid.UUID, decimal.Decimal)):
            return self.redactor.text(str(value))
        if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
            return value.isoformat()
        if _type_name(value) in ("torch.dtype", "torch.device", "numpy.dtype"):
            return str(value)
        return {"__object__": {"type": _type_name(value), "repr": self.redactor.text(_repr(value))}}

    def _array(self, array: Any, dtype: str) -> dict[str, Any]:
        summary: dict[str, Any] = {"shape": [int(n) for n in array.shape], "dtype": dtype}
        size = math.prod(summary["shape"])
        if size <= _MAX_VALUES:
            try:
                values = array.detach().cpu().tolist() if hasattr(array, "detach") else (
                    array.tolist()
                )
            except (RuntimeError, TypeError, ValueError):  # meta/sparse tensors, odd dtypes
                return summary
            summary["values"] = self.convert(values, "values", 0)
        return summary


def _unwrap(value: Any) -> Any:
    """The plain container behind a config object, or ``_MISSING`` if it is not one."""
    module = type(value).__module__.split(".", 1)[0]
    if module == "omegaconf":  # before Mapping: DictConfig is one, but would not resolve
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    if isinstance(value, tuple) and callable(getattr(value, "_asdict", None)):
        return value._asdict()  # type: ignore[attr-defined]  # namedtuple: keep field names
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if (module == "pydantic" or _has_pydantic_base(value)) and hasattr(type(value), "model_fields"):
        return value.model_dump()  # v2; SecretStr fields stay masked objects
    if _has_pydantic_base(value) and hasattr(type(value), "__fields__"):
        return value.dict()  # pydantic v1 (or pydantic.v1 in v2)
    if module == "transformers" and callable(getattr(value, "to_dict", None)):
        return value.to_dict()
    return _MISSING


def _has_pydantic_base(value: Any) -> bool:
    return any(c.__module__.startswith("pydantic.") for c in type(value).__mro__[1:])


def _float(value: float) -> float | str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


def _key(key: Any) -> str:
    if isinstance(key, Enum):
        key = key.value
    if isinstance(key, str):
        return str(key)
    if key is None or isinstance(key, bool):
        return json.dumps(key)  # "null", "true", "false": what json.dumps does to such keys
    if isinstance(key, float):
        return str(_float(key))
    return str(key)


def _is_number(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the run's capture
        text = f"<repr failed: {type(exc).__name__}>"
    text = _ADDRESS.sub("", text)
    if len(text) > _MAX_REPR:
        text = f"{text[:_MAX_REPR]}…[repro: repr truncated, {len(text)} chars]"
    return text


class ConfigCapture:
    """Utilities for capturing configuration and environment state (the seed's entry point)."""

    capture_config = staticmethod(capture_config)
    capture_environment = staticmethod(capture_environment)
    validate_environment = staticmethod(validate_environment)
