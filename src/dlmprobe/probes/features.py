"""Where a probe grid reads its features: the stored activations, or a random-weights twin's.

* :class:`StoredFeatures`: the dataset's own activations, one (site, step) block at a time;
* :class:`RandomWeightsFeatures`: the same sites of a randomly initialised model of the same
  architecture fed the stored canvases (the random-weights baseline), one forward pass per step:
  a built-in model rebuilt from the stored config, a Hugging Face model through
  :func:`store_handle` and :meth:`~dlmprobe.models.ModelHandle.random_copy`;
* :func:`store_handle`: the Hugging Face model a store was recorded from, loaded as it was;
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
from dlmprobe.models import ModelConfig, ModelHandle, from_checkpoint, load_hf_model, random_model
from dlmprobe.store import ActivationDataset

# Examples per forward pass of a Hugging Face random-weights model (a built-in one takes all at once).
HF_BATCH = 32


def is_hf_store(data: ActivationDataset) -> bool:
    """Whether a store was recorded from a Hugging Face model (``dlmprobe cache --model <id or folder>``)."""
    return (data.config.get("model") or {}).get("source") == "huggingface"


def store_handle(data: ActivationDataset) -> ModelHandle:
    """The Hugging Face model a store names, loaded with the stored options (remote code, dtype, placement).

    Nothing checks that the weights are those that wrote the store (no hash is recorded for them).
    """
    if not is_hf_store(data):
        raise DlmprobeInputError(f"expected a store recorded from a Hugging Face model, got {data.path.name} "
                                 f"(model {data.config.get('model', {}).get('name')!r})")
    model, cache = data.config["model"], data.config.get("cache") or {}
    return load_hf_model(model["model"], trust_remote_code=bool(model.get("trust_remote_code")),
                         dtype=cache.get("model_dtype"), device=cache.get("device") or "cpu",
                         device_map=model.get("device_map"))


def padding_mask(data: ActivationDataset, canvas: np.ndarray, pad: int | None) -> np.ndarray:
    """The 0/1 attention mask of stored text canvases: 0 on the prompt's left padding (``pad``)."""
    mask = np.ones_like(canvas)
    gen_start = (data.config.get("canvas") or {}).get("gen_start")
    if pad is not None and gen_start is not None:
        mask[:, :gen_start] = canvas[:, :gen_start] != pad
    return mask


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
    A built-in model is rebuilt from its stored config with the next seed; a Hugging Face model is
    loaded (:func:`store_handle`) and copied with fresh weights from ``seed`` (its padding masked
    as when it was recorded). ``handle``: the loaded model, to skip loading it again. A run through
    a model's own generate loop (:mod:`dlmprobe.capture_native`) cannot be replayed: refused.
    """

    def __init__(self, data: ActivationDataset, sites: Sequence[str], handle: ModelHandle | None = None, seed: int = 1):
        self.data, self.sites = data, list(sites)
        self.pad: int | None = None
        self.batch: int | None = None
        if handle is not None or is_hf_store(data):
            original = handle or store_handle(data)
            self.handle, self.batch = original.random_copy(seed), HF_BATCH
            tokenizer = original.tokenizer
            self.pad = None if tokenizer is None else tokenizer.pad_token_id
        elif data.config_entry("sampler", "name") == "native":
            raise DlmprobeInputError(f"{data.path.name} was recorded through the model's own generate loop "
                                     f"(capture_native), which a random-weights copy cannot replay here")
        else:
            model_config = data.config.get("model", {}).get("config")
            if model_config is None:
                raise DlmprobeInputError("the random-weights baseline needs the model config stored by dlmprobe cache")
            config = ModelConfig.from_dict({**model_config, "seed": int(model_config.get("seed", 0)) + seed})
            self.handle = from_checkpoint(random_model(config))
        self._step: int | None = None
        self._activations: dict[str, np.ndarray] = {}

    @property
    def model(self) -> torch.nn.Module:
        """The random-weights module (a TransformerLens bridge or a raw Hugging Face module)."""
        return self.handle.module

    @torch.no_grad()
    def __call__(self, site: str, step: int) -> np.ndarray:
        if site not in self.sites:
            raise DlmprobeInputError(f"site {site!r} is not among the random-weights model's recorded sites {self.sites}")
        if step != self._step:
            canvas = self.data.canvas[:, step].astype(np.int64)
            mask = padding_mask(self.data, canvas, self.pad) if self.pad is not None else None
            parts: dict[str, list[np.ndarray]] = {s: [] for s in self.sites}
            batch = self.batch or len(canvas)
            for start in range(0, len(canvas), batch):
                ids = torch.as_tensor(canvas[start : start + batch], device=self.handle.device)
                part = None if mask is None else torch.as_tensor(mask[start : start + batch], device=self.handle.device)
                _, acts = self.handle.run_with_cache(ids, self.sites, part)
                for s in self.sites:
                    parts[s].append(acts[s][:, self.data.positions].float().cpu().numpy())
            self._activations = {s: np.concatenate(parts[s]) for s in self.sites}
            self._step = step
        stored = self.data.activations(site, step)
        return np.where(np.isnan(stored), np.nan, self._activations[site])  # same rows missing as in the real store


FeatureSource = StoredFeatures | RandomWeightsFeatures


def frontier_positions(data: ActivationDataset, step: int) -> np.ndarray:
    """Per example, the canvas position of the last written token of the target's prefix at ``step``.

    That is the token before the first target position not yet committed (``<sep>`` if the first
    one is not; the last target position if all are; "committed" as :meth:`ActivationDataset.before_commit`
    decides). For an autoregressive model at step ``s`` it is ``target_start + s - 1``, the position
    whose forward pass writes the next token.
    """
    length = data.output.shape[1]
    target = data.target_start + np.arange(length)
    pending = data.before_commit(step, np.arange(data.n_examples)[:, None], target[None, :])  # (n, length)
    first_pending = np.where(pending.any(axis=1), pending.argmax(axis=1), length)
    return data.target_start - 1 + first_pending


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
