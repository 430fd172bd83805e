"""One naming function for every PEFT weight, shared by priors, guides and exports.

A site is named ``"<module path>.<weight>"``, where the module path is the
dotted path of the injected module inside the Hugging Face model, e.g.
``encoder.layer.3.attention.self.query.lora_A``.  Hyper-parameters of a
hierarchical prior extend their site's name with ``_``: ``<site>_horseshoe_tau``
(not ``.``: autoguides store parameters in modules nested by the dots, and a
weight cannot also be a container).

The same matcher selects modules (``target_modules``) and sites (prior and
guide patterns), with the semantics of Hugging Face ``peft``: a pattern matches
a name if it is equal to it, if it is a suffix of it at a ``.`` boundary, or,
failing both, if it is a regular expression that matches the whole name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TypeVar

T = TypeVar("T")


def site_name(module_path: str, weight: str) -> str:
    """Name of the sample site of ``weight`` in the module at ``module_path``."""
    return f"{module_path}.{weight}" if module_path else weight


def hyper_site_name(site: str, hyper: str) -> str:
    """Name of a hyper-parameter site ``hyper`` of the prior of ``site``."""
    return f"{site}_{hyper}"


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` selects ``name`` (exact, ``.``-suffix, or full regex)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    regex = _compiled(pattern)
    return regex is not None and regex.fullmatch(name) is not None


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether any of ``patterns`` selects ``name``."""
    return any(matches(name, p) for p in patterns)


def resolve(
    name: str,
    component: str,
    patterns: Mapping[str, T],
    components: Mapping[str, T],
    default: T,
) -> T:
    """Setting for one site: the first pattern that matches its name wins, then
    its component's entry, then ``default``."""
    for pattern, value in patterns.items():
        if matches(name, pattern):
            return value
    return components.get(component, default)
