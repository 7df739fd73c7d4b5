"""Detectors, one per module, registered by name with ``@register``.

Every public module of this package is imported here, so adding a detector is adding a module:
no list to edit. ``get(name)`` returns the class, ``available()`` the names.
"""

from __future__ import annotations

import importlib
import pkgutil

from probes._base import REGISTRY, Claim, Detector, ForwardPass, PaperClaim, Params, ProbeError, builtin_probe_file, parse_param_flags, register
from probes._overview import OKABE_ITO, OverviewLabel, OverviewScore, Rows

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


class UnknownDetectorError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def available() -> list[str]:
    return sorted(REGISTRY.detectors)


def get(name: str) -> type[Detector]:
    try:
        return REGISTRY.detectors[name]
    except KeyError:
        raise UnknownDetectorError(f"unknown detector {name!r}; available: {', '.join(available())}") from None


__all__ = ["OKABE_ITO", "Claim", "Detector", "ForwardPass", "OverviewLabel", "OverviewScore", "PaperClaim", "Params", "ProbeError", "Rows",
           "UnknownDetectorError", "available", "builtin_probe_file", "get", "parse_param_flags", "register"]
