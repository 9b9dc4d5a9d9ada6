"""Where a probe grid reads its features: the stored activations, or a random-weights twin's.

* :class:`StoredFeatures`: the dataset's own activations, one (site, step) block at a time;
* :class:`RandomWeightsFeatures`: the same sites of a randomly initialised model of the same
  architecture fed the stored canvases (the random-weights baseline), one forward pass per step;
* :func:`frontier_positions`: the last written token of the target's prefix, for frontier reads;
* :func:`subsample_rows`: a cell's rows capped at a count, the same ones whatever is read there.

Example:
    >>> features = RandomWeightsFeatures(data, data.sites)
    >>> features("blocks.1.hook_resid_post", step=3).shape   # (examples, stored positions, d)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import ModelConfig, random_model
from dlmprobe.store import ActivationDataset


class StoredFeatures:
    """The dataset's own activations, one (site, step) block at a time."""

    def __init__(self, data: ActivationDataset):
        self.data = data

    def __call__(self, site: str, step: int) -> np.ndarray:
        return self.data.activations(site, step)


class RandomWeightsFeatures:
    """The same sites of a randomly initialised model of the same architecture, fed the stored
    canvases (so the inputs are identical; only the weights differ).

    One forward pass per step records every site; a grid asks for all sites of a step in a row.
    """

    def __init__(self, data: ActivationDataset, sites: Sequence[str]):
        model_config = data.config.get("model", {}).get("config")
        if model_config is None:
            raise DlmprobeInputError("the random-weights baseline needs the model config stored by dlmprobe cache")
        config = ModelConfig.from_dict({**model_config, "seed": int(model_config.get("seed", 0)) + 1})
        self.model = random_model(config).model
        self.data, self.sites = data, list(sites)
        self._step: int | None = None
        self._activations: dict[str, np.ndarray] = {}

    @torch.no_grad()
    def __call__(self, site: str, step: int) -> np.ndarray:
        if site not in self.sites:
            raise DlmprobeInputError(f"site {site!r} is not among the random-weights model's recorded sites {self.sites}")
        if step != self._step:
            canvas = torch.as_tensor(self.data.canvas[:, step], dtype=torch.long)
            _, cache = self.model.run_with_cache(canvas, names_filter=self.sites)
            self._activations = {s: cache[s][:, self.data.positions].float().numpy() for s in self.sites}
            self._step = step
        stored = self.data.activations(site, step)
        return np.where(np.isnan(stored), np.nan, self._activations[site])  # same rows missing as in the real store


FeatureSource = StoredFeatures | RandomWeightsFeatures


def frontier_positions(data: ActivationDataset, step: int) -> np.ndarray:
    """Per example, the canvas position of the last written token of the target's prefix at ``step``.

    That is the token before the first still-masked target position (``<sep>`` if the first one is
    still masked; the last target position if none is). For an autoregressive model at step ``s``
    it is ``target_start + s - 1``, the position whose forward pass writes the next token.
    """
    length = data.output.shape[1]
    masked = data.canvas[:, step, data.target_start : data.target_start + length] == data.mask_id
    first_masked = np.where(masked.any(axis=1), masked.argmax(axis=1), length)
    return data.target_start - 1 + first_masked


def subsample_rows(mask: np.ndarray, limit: int | None, key: tuple[int, ...]) -> np.ndarray:
    """``mask`` with at most ``limit`` of its True entries kept, drawn from ``key`` (seed, step, slot).

    The draw depends on the key alone, so every site and label definition of a cell keeps the same rows.
    """
    if limit is None or mask.sum() <= limit:
        return mask
    chosen = np.random.default_rng([k % 2**32 for k in key]).choice(int(mask.sum()), int(limit), replace=False)
    out = np.zeros(mask.size, dtype=bool)
    out[np.flatnonzero(mask)[chosen]] = True
    return out.reshape(mask.shape)
