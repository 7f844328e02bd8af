"""The task domains and where each one's problems, prompt and verifier live (``envs/domains/<domain>.py``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from prorl_async.errors import UserError

if TYPE_CHECKING:
    from prorl_async.envs.problem import FiniteProblems, ProceduralProblems

DOMAINS = ("logic", "math", "code", "stem", "instruction")


def domain_module(domain: str) -> ModuleType:
    """The module of ``domain`` (imported on first use: each pulls in its own data libraries)."""
    if domain not in DOMAINS:
        raise UserError(f"unknown task domain {domain!r} (allowed: {', '.join(DOMAINS)})")
    return importlib.import_module(f"prorl_async.envs.domains.{domain}")


def problems_for(domain: str, name: str, params: Mapping[str, Any]) -> FiniteProblems | ProceduralProblems:
    """The problems of one task spec; raises UserError for an unknown name or bad params."""
    return domain_module(domain).problems(name, dict(params))
