"""Site selection: which activations to record, named the way TransformerLens names them.

A ``names_filter`` is what TransformerLens' ``run_with_cache`` accepts, normalised once: a single
name, a list of names, or a predicate ``str -> bool``. Strings may also be glob patterns
(``"blocks.*.hook_resid_post"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError

NamesFilter = str | Sequence[str] | Callable[[str], bool]


def is_transformer_lens(model: torch.nn.Module) -> bool:
    """Whether ``model`` has TransformerLens hook points (``hooks`` and ``hook_dict``)."""
    return hasattr(model, "hooks") and hasattr(model, "hook_dict")


def main_output(value: Any) -> Tensor:
    """The hidden states in a module's output."""
    # Hugging Face decoder layers return tuples in older transformers and tensors in 5.x: taking
    # [0] of a tensor would silently keep batch row 0.
    if isinstance(value, (tuple, list)):
        return value[0]
    return value


def firing_hook_names(model: torch.nn.Module) -> list[str]:
    """Hook names of a TransformerLens model that fire in a forward pass, in execution order.

    Some hook points exist but only fire with optional settings (e.g. ``attn.hook_result``), so the
    list comes from one tiny forward pass rather than from ``hook_dict``.
    """
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(torch.zeros((1, 1), dtype=torch.long, device=device))
    return list(cache.keys())


def resolve_sites(names_filter: NamesFilter, available: Iterable[str]) -> list[str]:
    """The names in ``available`` (kept in its order) selected by ``names_filter``.

    Raises ``DlmprobeInputError`` naming what was asked for and what exists if a name or pattern matches
    nothing.
    """
    available = list(available)
    if callable(names_filter):
        chosen = [name for name in available if names_filter(name)]
        if not chosen:
            raise DlmprobeInputError("the site predicate matched no hook name of this model")
        return chosen
    patterns = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    if not patterns:
        raise DlmprobeInputError("no sites given: expected a hook name, a list of names, a glob or a predicate")
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            examples = ", ".join(available[:4] + ["..."] + [n for n in available if "resid_post" in n][:2])
            raise DlmprobeInputError(f"unknown site {pattern!r}: expected a hook name of this model such as {examples}")
        chosen.update(matched)
    return [name for name in available if name in chosen]


def layer_of(site: str) -> int | None:
    """The block index in a TransformerLens hook name (``blocks.3.hook_resid_post`` -> 3), else None."""
    parts = site.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
