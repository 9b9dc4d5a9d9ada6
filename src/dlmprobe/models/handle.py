"""One interface to every model the kit probes: built-in checkpoints and Hugging Face models.

Samplers, recorders, probe baselines and analyses talk to a :class:`ModelHandle` and never ask
where the model came from. Two backends sit behind it:

* ``"transformer_lens"``: ``module`` is a ``TransformerBridge`` (the built-in models; LLaDA, Dream,
  LLaDA2-MoE, GIDD, BD3LM through TransformerLens's adapters). Sites are its hook names.
* ``"nnsight"``: ``module`` is the raw Hugging Face module (any ``*ForMaskedLM`` or
  ``*ForCausalLM``); sites are addressed by module path, and :attr:`site_paths` maps the
  TransformerLens-style names the store keeps (``blocks.{i}.hook_resid_post``) to those paths.

Conventions, the same for every model:

* :meth:`logits` predicts the token *at* each position. Where the hidden state at ``i`` predicts
  token ``i + 1`` (``shifted``: Dream, every causal LM incl. the built-in autoregressive twins) the
  logits are moved one place right; position 0, never generated, keeps its own (as Dream's sampler
  does). :attr:`read_offset` (0 or -1) says which hidden state a "position rule" should read for a
  position: the one whose output predicts it.
* ``blocks.{i}.hook_resid_post`` is block ``i``'s output. For the last block that is *before* the
  final norm (TransformerLens's convention), whereas Hugging Face's ``hidden_states[-1]`` is after
  it; ``hidden_states[i + 1]`` equals ``blocks.{i}.hook_resid_post`` for every other block.
* ``mask_id`` comes from the model's config or tokenizer, never assumed (None for causal LMs).

Example:
    >>> handle = from_checkpoint(load_model("arith-diffusion"))
    >>> logits = handle.logits(canvas)                       # (batch, pos, vocab)
    >>> logits, acts = handle.run_with_cache(canvas, [handle.resid_site(1)])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models.checkpoint import Checkpoint, random_model
from dlmprobe.models.config import ModelConfig

BackendName = Literal["transformer_lens", "nnsight"]
Kind = Literal["diffusion", "autoregressive"]
RESID_POST = "blocks.{}.hook_resid_post"
# A site edit: the activation in, the (possibly changed) activation out.
Edit = Callable[[Tensor], Tensor]
# (ids, attention_mask) -> the keyword arguments of one forward call of the wrapped module.
InputAdapter = Callable[[Tensor, "Tensor | None"], dict[str, Any]]


def padding_mask_kwargs(ids: Tensor, attention_mask: Tensor | None) -> dict[str, Any]:
    """The plain convention: a (batch, pos) 0/1 padding mask, or nothing."""
    return {} if attention_mask is None else {"attention_mask": attention_mask}


def _logits_of(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def _main(value: Any) -> Tensor:
    # transformers 5.x layers return a tensor; older ones a tuple whose first element is the state.
    return value[0] if isinstance(value, (tuple, list)) else value


@dataclass
class ModelHandle:
    """A model with everything a sampler, recorder or analysis needs to know about it.

    Build one with :func:`from_checkpoint` or :func:`dlmprobe.models.huggingface.load_hf_model`.
    """

    module: torch.nn.Module
    backend: BackendName
    kind: Kind
    mask_id: int | None
    n_layers: int
    d_model: int
    vocab_size: int
    shifted: bool = False
    tokenizer: Any = None
    name: str = ""
    #: nnsight backend: module path of each block (its output is ``blocks.{i}.hook_resid_post``)
    layer_paths: tuple[str, ...] = ()
    input_adapter: InputAdapter = padding_mask_kwargs
    info: dict[str, Any] = field(default_factory=dict)
    rebuild: Callable[[int], ModelHandle] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.backend == "nnsight" and len(self.layer_paths) != self.n_layers:
            raise ValueError(f"an nnsight handle needs one module path per block ({self.n_layers}), got {self.layer_paths}")

    # -- facts ---------------------------------------------------------------------------------
    @property
    def read_offset(self) -> int:
        """Which hidden state predicts a position: 0 (its own) or -1 (the one before)."""
        return -1 if self.shifted else 0

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def resid_site(self, layer: int) -> str:
        """The name of block ``layer``'s output (negative counts from the end)."""
        if not -self.n_layers <= layer < self.n_layers:
            raise DlmprobeInputError(f"expected a layer in [{-self.n_layers}, {self.n_layers}), got {layer}")
        return RESID_POST.format(layer % self.n_layers)

    @staticmethod
    def layer_of(site: str) -> int | None:
        """The block index of a site name (``blocks.3.hook_resid_post`` -> 3), else None."""
        parts = site.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None

    @property
    def site_paths(self) -> dict[str, str]:
        """nnsight backend: stored site name -> module path. Empty for TransformerLens models."""
        return {RESID_POST.format(i): path for i, path in enumerate(self.layer_paths)}

    # -- forward passes ------------------------------------------------------------------------
    def _shift(self, raw: Tensor) -> Tensor:
        if not self.shifted:
            return raw
        return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)

    def _kwargs(self, ids: Tensor, attention_mask: Tensor | None) -> dict[str, Any]:
        ids = ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.input_adapter(ids, mask)

    def _check_sites(self, sites: Sequence[str]) -> None:
        known = self.site_paths if self.backend == "nnsight" else self.module.hook_dict
        unknown = [s for s in sites if s not in known]
        if unknown:
            raise DlmprobeInputError(f"unknown site {unknown[0]!r}: expected a site of this model such as {list(known)[-3:]}")

    @torch.no_grad()
    def logits(self, ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos vocab"]:
        """Logits predicting the token at each position (see the module docstring on shifts)."""
        kwargs = self._kwargs(ids, attention_mask)
        if self.backend == "transformer_lens":
            return self._shift(self.module(ids.to(self.device), **kwargs))
        return self._shift(_logits_of(self.module(input_ids=ids.to(self.device), **kwargs)))

    __call__ = logits

    @torch.no_grad()
    def run_with_cache(
        self, ids: Int[Tensor, "batch pos"], sites: Sequence[str], attention_mask: Int[Tensor, "batch pos"] | None = None
    ) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Float[Tensor, "batch pos d"]]]:
        """Logits (as :meth:`logits`) and the activations at ``sites``, detached, in the model's dtype."""
        return self.run_with_hooks(ids, {}, attention_mask, record=sites)

    @torch.no_grad()
    def run_with_hooks(
        self,
        ids: Int[Tensor, "batch pos"],
        edits: Mapping[str, Edit],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        record: Sequence[str] = (),
    ) -> Any:
        """Logits with each ``edits[site]`` applied to that site's activation (scoped to this call).

        With ``record`` sites, returns ``(logits, {site: activation after any edit})`` instead.
        """
        self._check_sites([*edits, *record])
        kwargs = self._kwargs(ids, attention_mask)
        ids = ids.to(self.device)
        saved: dict[str, Tensor] = {}
        if self.backend == "transformer_lens":
            def make(site: str):
                def hook(activation: Tensor, hook: Any) -> Tensor:
                    if site in edits:
                        activation = edits[site](activation)
                    if site in record:
                        saved[site] = activation.detach()
                    return activation
                return hook

            hooks = [(site, make(site)) for site in dict.fromkeys([*edits, *record])]
            raw = self.module.run_with_hooks(ids, fwd_hooks=hooks, **kwargs)
        else:
            raw = self._nnsight_run(ids, kwargs, edits, record, saved)
        logits = self._shift(raw)
        return (logits, {s: saved[s] for s in record}) if record else logits

    def _nnsight_run(self, ids: Tensor, kwargs: dict[str, Any], edits: Mapping[str, Edit], record: Sequence[str], saved: dict[str, Tensor]) -> Tensor:
        from nnsight import NNsight

        envoy = NNsight(self.module)
        # nnsight wants modules requested in execution order: the block order.
        sites = sorted(dict.fromkeys([*edits, *record]), key=lambda s: self.layer_of(s))
        proxies: dict[str, Any] = {}
        with envoy.trace(input_ids=ids, **kwargs):
            for site in sites:
                layer = envoy.get(self.site_paths[site])
                if site in edits:
                    layer.output = edits[site](_main(layer.output))
                if site in record:
                    proxies[site] = _main(layer.output).save()
            output = envoy.output.save()
        saved.update({site: value.detach() for site, value in proxies.items()})
        return _logits_of(output)

    # -- baselines and provenance --------------------------------------------------------------
    def random_copy(self, seed: int) -> ModelHandle:
        """The same architecture (from the config) with fresh random weights drawn from ``seed``."""
        if self.rebuild is None:
            raise DlmprobeInputError(f"model {self.name!r} has no recipe for a random-weights copy")
        return self.rebuild(seed)

    def describe(self) -> dict[str, Any]:
        """What the store records about the model of a run."""
        return {
            "name": self.name,
            "backend": self.backend,
            "kind": self.kind,
            "mask_id": self.mask_id,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "shifted_logits": self.shifted,
            "read_offset": self.read_offset,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "last_resid_post": "before the final norm",
            **self.info,
        }


def from_checkpoint(ckpt: Checkpoint) -> ModelHandle:
    """A built-in model (``load_model`` / ``random_model``) as a handle; its mask is the task's."""
    config: ModelConfig = ckpt.config

    def rebuild(seed: int) -> ModelHandle:
        fresh = random_model(ModelConfig.from_dict({**config.to_dict(), "seed": seed}))
        fresh.model.to(next(ckpt.model.parameters()).device)
        handle = from_checkpoint(fresh)
        handle.info["random_weights_seed"] = seed
        return handle

    return ModelHandle(
        module=ckpt.model,
        backend="transformer_lens",
        kind=config.kind,
        mask_id=ckpt.task.vocab.mask_id,
        n_layers=config.n_layers,
        d_model=config.d_model,
        vocab_size=config.d_vocab,
        shifted=config.kind == "autoregressive",
        name=str(ckpt.path.name) if ckpt.path is not None else f"random-{config.task}-{config.kind}",
        info={"source": "builtin", "config": config.to_dict()},
        rebuild=rebuild,
    )
