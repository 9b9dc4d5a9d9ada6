"""What a sampling step needs from the logits, computed without a full-vocabulary softmax.

At LLaDA scale the logits of one step are batch 64 x 512 positions x 126k vocab; a float32 softmax
of them is ~16 GB. Everything the samplers use is a handful of numbers per position: the max logit,
``norm = Σ exp(logit - max)`` (a probability is ``exp(logit - max) / norm``), the top-2 logits other
than the mask token, the chosen token and its logit, and (for the entropy order) ``Σ p log p``.
:func:`summarise` computes them a chunk of positions at a time, so at most ``chunk x vocab``
float32 values exist at once besides the logits themselves.

**The mask token.** Probabilities are normalised over the whole vocabulary, mask token included, as
LLaDA's and Dream's reference samplers do (``softmax(logits)``), so scores equal theirs. The one
deviation: the mask token is never *chosen* (the references would commit it and leave the position
masked; a trained model practically never predicts it), so the argmax and the top-2 exclude it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

# float32 values per chunk: 2^24 (64 MiB), whatever the vocabulary.
CHUNK_VALUES = 1 << 24


@dataclass
class LogitSummary:
    """Per position: ``top`` the max logit (mask included), ``norm`` = Σ exp(logit - top), ``top2``
    the two largest logits and ``argmax`` the largest's token (mask excluded), ``chosen`` the token
    sampled (the argmax at temperature 0) and ``chosen_logit`` its logit, ``neg_entropy`` Σ p log p
    (or None when not asked for)."""

    top: Float[Tensor, "batch window"]
    norm: Float[Tensor, "batch window"]
    top2: Float[Tensor, "batch window 2"]
    argmax: Int[Tensor, "batch window"]
    chosen: Int[Tensor, "batch window"]
    chosen_logit: Float[Tensor, "batch window"]
    neg_entropy: Float[Tensor, "batch window"] | None

    def probability(self, logit: Tensor) -> Tensor:
        # exp(logit - top) / norm, not exp(logit - logsumexp): logsumexp's absolute rounding (~1e-6
        # near 10) would merge near-1 confidences a few ulps apart, whose order decides commits.
        return (logit - self.top).exp() / self.norm

    @property
    def confidence(self) -> Float[Tensor, "batch window"]:
        """The argmax's probability."""
        return self.probability(self.top2[..., 0])

    @property
    def chosen_probability(self) -> Float[Tensor, "batch window"]:
        return self.probability(self.chosen_logit)

    @property
    def margin(self) -> Float[Tensor, "batch window"]:
        """Top-1 minus top-2 probability (Dream's ``topk_margin``)."""
        return self.probability(self.top2[..., 0]) - self.probability(self.top2[..., 1])

    def __getitem__(self, index: slice) -> LogitSummary:
        """The positions ``index`` of the window."""
        return LogitSummary(*(None if v is None else v[:, index] for v in (
            self.top, self.norm, self.top2, self.argmax, self.chosen, self.chosen_logit, self.neg_entropy)))


def summarise(logits: Float[Tensor, "batch window vocab"], mask_id: int | None, temperature: float,
              generator: torch.Generator, entropy: bool = False) -> LogitSummary:
    """:class:`LogitSummary` of ``logits`` (any dtype; computed in float32, a chunk of positions at a
    time). At ``temperature > 0`` the chosen token is ``argmax(logits / temperature + Gumbel noise)``,
    the noise drawn from ``generator`` (CPU) in row-major order of (batch, window, vocab)."""
    batch, window, vocab = logits.shape
    flat = logits.reshape(batch * window, vocab)
    chunk = max(1, CHUNK_VALUES // vocab)
    parts = []
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk].to(torch.float32, copy=True)  # (rows, vocab)
        top = part.max(-1).values
        shifted = part - top.unsqueeze(-1)
        norm = shifted.exp().sum(-1)
        neg_entropy = None
        if entropy:  # Σ p log(p + 1e-10), as Dream computes it (the epsilon keeps 0 log 0 at 0)
            probs = shifted.exp() / norm.unsqueeze(-1)
            neg_entropy = (probs * (probs + 1e-10).log()).sum(-1)
        if mask_id is not None:
            part[:, mask_id] = float("-inf")
        top2, index = part.topk(2, dim=-1)
        if temperature > 0:
            uniform = torch.rand(part.shape, generator=generator).to(part.device)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
            chosen = (part / temperature + gumbel).argmax(-1)
        else:
            chosen = index[:, 0]
        chosen_logit = part.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        parts.append((top, norm, top2, index[:, 0], chosen, chosen_logit, neg_entropy))
    columns = []
    for values in zip(*parts):
        columns.append(None if values[0] is None else torch.cat(values).reshape(batch, window, *values[0].shape[1:]))
    return LogitSummary(*columns)
