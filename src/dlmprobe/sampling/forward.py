"""How the sampler loop runs a model: the logits of the positions a step predicts.

One path for every model: a :class:`~dlmprobe.models.handle.ModelHandle` (built-in checkpoints
through ``from_checkpoint``, Hugging Face models through ``load_hf_model``). A bare module is taken
too, as the handle would hold it (a built-in TransformerLens model, or a recorder's ``model``): a
denoiser whose output at ``p`` predicts ``p``, or, under an autoregressive policy, a causal model.

* A denoiser step (policy ``shift = 0``) reads the whole canvas through :meth:`ModelHandle.logits`,
  which predicts the token *at* each position (Dream's shift handled there).
* A causal step (``shift = 1``) reads the positions before the one it writes, and position ``p`` is
  predicted by the module's output at ``p - 1``. With ``use_cache`` and a Hugging Face model that
  has a KV cache (a ``PreTrainedModel`` that can generate) the module runs only on the positions not
  yet in its cache; if a callback changed a position the cache holds, the cache is dropped and the
  prefix recomputed, so the cache never changes what the model sees.

Observers learn the canvas the step reads (``canvas[:, :read_stop]``); a forward pass over ``n``
positions computes the last ``n`` of them (all of them without a cache).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dlmprobe.models.handle import InputAdapter, ModelHandle, padding_mask_kwargs


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, or an object with ``.logits`` (Hugging Face)."""
    return output.logits if hasattr(output, "logits") else output


def has_kv_cache(module: torch.nn.Module) -> bool:
    """Whether ``module`` (or the module a recorder wraps, its ``wrapped``) is a Hugging Face model
    that can generate, i.e. takes a KV cache and returns it updated."""
    from transformers import PreTrainedModel

    inner = getattr(module, "wrapped", module)
    return isinstance(inner, PreTrainedModel) and inner.can_generate()


def _cache_argument(module: torch.nn.Module) -> str:
    # transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
    parameters = inspect.signature(getattr(module, "wrapped", module).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class StepForward:
    """Runs ``model`` for one sampler step (see the module docstring)."""

    def __init__(self, model: ModelHandle | torch.nn.Module, causal: bool, use_cache: bool):
        self.handle = model if isinstance(model, ModelHandle) else None
        self.module: torch.nn.Module = model.module if self.handle is not None else model
        self.adapter: InputAdapter = self.handle.input_adapter if self.handle is not None else padding_mask_kwargs
        self.device = next(self.module.parameters()).device
        self.cached = causal and use_cache and has_kv_cache(self.module)
        self._cache_argument = _cache_argument(self.module) if self.cached else ""
        self._cache: Any = None
        self._fed: Tensor | None = None  # the tokens the cache holds

    def read_stop(self, window: slice, shift: int) -> int:
        """The canvas positions ``[0, read_stop)`` the step reads."""
        return window.stop - shift

    def __call__(self, canvas: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None,
                 window: slice, shift: int) -> Float[Tensor, "batch window vocab"]:
        stop = self.read_stop(window, shift)
        mask = None if attention_mask is None else attention_mask[:, :stop]
        if shift == 0:
            ids = canvas[:, :stop]
            if self.handle is not None:
                return self.handle.logits(ids, mask)[:, window]
            return logits_of(self.module(ids, **self.adapter(ids, mask)))[:, window]
        if not self.cached:
            ids = canvas[:, :stop]
            return logits_of(self.module(ids, **self.adapter(ids, mask)))[:, window.start - shift : stop]
        return self._cached(canvas, mask, window.start - shift, stop)

    def _cached(self, canvas: Tensor, mask: Tensor | None, start: int, stop: int) -> Tensor:
        fed = 0 if self._fed is None else self._fed.shape[1]
        if fed and (fed > start or not torch.equal(canvas[:, :fed], self._fed)):
            self._cache, fed = None, 0  # a callback edited what the cache holds: recompute the prefix
        ids = canvas[:, fed:stop]
        output = self.module(ids, **self.adapter(ids, mask), **{self._cache_argument: self._cache}, use_cache=True)
        self._cache, self._fed = getattr(output, self._cache_argument), canvas[:, :stop].clone()
        return logits_of(output)[:, start - fed : stop - fed]
