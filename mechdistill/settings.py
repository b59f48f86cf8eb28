"""Typed settings: what a stage reads from the validated config, declared once.

A settings class is a frozen dataclass (in the phase package that consumes it) that lists the dotted
config keys it reads in `KEYS`; a key may name a wildcard in braces, e.g.
"datasets.{dataset}.candidates". Two things come from that one declaration:

- `from_config(config, **names)`: the object a stage builds and passes to the library. It is made
  by `from_values` from the declared keys' values only (`Declared`: reading a key that is not
  declared raises `UndeclaredKey`), so a key a stage reads is a key it declares.
- `params(config, **names)`: those values as canonical JSON, a rule's `settings` param
  (rules/common.smk), so a key a stage reads is a key that reruns its rule.

Defaults are the schema's (config/schema.yaml fills them in at start): a key the schema gives no
default and the config leaves out reads as None.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

S = TypeVar("S", bound="Settings")
PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder")


class UndeclaredKey(KeyError):
    """A settings class read a config key its KEYS do not declare."""


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted `key` ("heads.coarse.keys"); None where a part is absent."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class Declared(dict):
    """The declared keys' values of one settings class (KEYS as written, wildcards unfilled)."""

    def __init__(self, owner: str, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.owner = owner

    def __missing__(self, key: str) -> Any:
        raise UndeclaredKey(f"{self.owner} reads config key {key!r}, which its KEYS do not declare; add it to "
                            f"{self.owner}.KEYS (its rule's params come from them)")

    def section(self, prefix: str, names: tuple[str, ...]) -> dict[str, Any]:
        """{name: value of `prefix + name`} for each of `names`, e.g. a model placement's three keys."""
        return {name: self[prefix + name] for name in names}


class Settings:
    """Base of the settings classes: `KEYS` and the two things made from them (see the module)."""

    KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def values(cls, config: Mapping[str, Any], **names: Any) -> Declared:
        """The declared keys (as written) -> their values in `config`, wildcards filled from `names`."""
        return Declared(cls.__name__, {key: lookup(config, key.format(**names)) for key in cls.KEYS})

    @classmethod
    def params(cls, config: Mapping[str, Any], **names: Any) -> str:
        """Canonical JSON of the declared keys' values (filled keys, sorted): a rule's params."""
        return json.dumps({key.format(**names): value for key, value in cls.values(config, **names).items()},
                          sort_keys=True)

    @classmethod
    def from_config(cls: type[S], config: Mapping[str, Any], **names: Any) -> S:
        """The settings of `config` (validated, defaults filled), built from the declared keys only."""
        return cls.from_values(cls.values(config, **names))

    @classmethod
    def from_values(cls: type[S], values: Declared) -> S:
        raise NotImplementedError(f"{cls.__name__}.from_values")


@dataclass(frozen=True)
class OneKeySettings(Settings):
    """The settings of a stage that reads one key (KEYS holds it): its value."""

    value: Any

    @classmethod
    def from_values(cls, values: Declared) -> OneKeySettings:
        return cls(values[cls.KEYS[0]])
