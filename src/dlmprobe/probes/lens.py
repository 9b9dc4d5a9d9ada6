"""The model's own read-out beside every probe: the logit lens on stored activations.

A probe on the last block of a denoiser mostly re-reads the model's x0 prediction, which masked
diffusion training asks for. So before "the probe knows the answer" means anything, compare it
with what the model itself says at the same rows:

* the **logit lens** (nostalgebraist 2020): the final norm and unembedding applied to a site's
  activations, as the model applies them to its last block (``blocks.{i}.hook_resid_post`` is
  *before* the final norm, see :mod:`dlmprobe.models.handle`), argmax over the vocabulary;
* the **final-layer read-out**: the argmax the sampler recorded at that step and position
  (``ActivationDataset.prediction``), the model's own prediction.

Both leave out the mask token, as the sampler does. Rows are those of
:func:`dlmprobe.probes.baselines.label_rows`. A :class:`~dlmprobe.probes.ProbeGrid` puts both beside
every probe, on the probe's own rows and features, with :class:`ModelReaders` from
:func:`readers_of` (a model) or :func:`store_readers` (the model a store names, built-in, Hugging Face
or DiffusionGemma).

Example:
    >>> readout = readout_of(from_checkpoint(load_model("sudoku-diffusion")))
    >>> lens_table(data, readout, "blank", step=0)[["site", "lens_accuracy", "readout_accuracy"]]
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import layer_of
from dlmprobe.models import ModelHandle, from_checkpoint, load_model
from dlmprobe.probes.baselines import label_rows
from dlmprobe.probes.features import is_hf_store, store_handle
from dlmprobe.sampling.native import load_native_model
from dlmprobe.store import ActivationDataset

NormKind = Literal["layernorm", "rmsnorm", "none"]


@dataclass(frozen=True)
class Readout:
    """A model's read-out of a residual activation: its final norm, then its unembedding.

    ``W_U`` is (d, vocab) and ``b_U`` (vocab,) or None. ``norm`` is the final norm's kind:
    ``layernorm`` (centre, divide by the standard deviation, then ``* weight + bias``),
    ``rmsnorm`` (divide by the root mean square, then ``* weight``) or ``none``.
    """

    W_U: Float[np.ndarray, "d vocab"]
    b_U: Float[np.ndarray, " vocab"] | None = None
    norm: NormKind = "none"
    norm_weight: Float[np.ndarray, " d"] | None = None
    norm_bias: Float[np.ndarray, " d"] | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.norm not in ("layernorm", "rmsnorm", "none"):
            raise DlmprobeInputError(f"norm must be 'layernorm', 'rmsnorm' or 'none', got {self.norm!r}")
        if np.ndim(self.W_U) != 2:
            raise DlmprobeInputError(f"expected W_U of shape (d, vocab), got {np.shape(self.W_U)}")

    def normalise(self, X: Float[np.ndarray, "row d"]) -> Float[np.ndarray, "row d"]:
        X = np.asarray(X, dtype=np.float64)
        if self.norm == "layernorm":
            X = X - X.mean(axis=-1, keepdims=True)
            X = X / np.sqrt((X**2).mean(axis=-1, keepdims=True) + self.eps)
        elif self.norm == "rmsnorm":
            X = X / np.sqrt((X**2).mean(axis=-1, keepdims=True) + self.eps)
        if self.norm != "none":
            X = X * (1.0 if self.norm_weight is None else self.norm_weight)
            X = X + (0.0 if self.norm_bias is None else self.norm_bias)
        return X

    def logits(self, X: Float[np.ndarray, "row d"]) -> Float[np.ndarray, "row vocab"]:
        """Logits the model would give if ``X`` were its last block's output, (rows, vocab) float32."""
        if np.shape(X)[-1] != self.W_U.shape[0]:
            raise DlmprobeInputError(f"expected activations of width {self.W_U.shape[0]}, got shape {np.shape(X)}")
        out = self.normalise(X) @ self.W_U
        if self.b_U is not None:
            out = out + self.b_U
        return out.astype(np.float32)

    def predict(self, X: Float[np.ndarray, "row d"], exclude: Sequence[int] = ()) -> Int[np.ndarray, " row"]:
        """The argmax token of each row, never one of ``exclude`` (the mask token, as the sampler does)."""
        logits = self.logits(X)
        logits[:, list(exclude)] = -np.inf
        return logits.argmax(axis=-1).astype(np.int64)


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    # TransformerLens's bridge wraps each original module as ``_original_component``.
    return getattr(module, "_original_component", module)


def _array(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().float().cpu().numpy().astype(np.float64)


def _norm_readout(norm: torch.nn.Module, W_U: np.ndarray, b_U: np.ndarray | None) -> Readout:
    if isinstance(norm, torch.nn.LayerNorm):
        return Readout(W_U, b_U, "layernorm", _array(norm.weight), _array(norm.bias), float(norm.eps))
    if "rms" in type(norm).__name__.lower():
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        if eps is None:
            raise DlmprobeInputError(f"cannot find the epsilon of final norm {type(norm).__name__}")
        return Readout(W_U, b_U, "rmsnorm", _rms_scale(norm, W_U.shape[0], float(eps)), None, float(eps))
    raise DlmprobeInputError(f"expected a LayerNorm or RMSNorm final norm, got {type(norm).__name__}")


def _rms_scale(norm: torch.nn.Module, width: int, eps: float) -> np.ndarray:
    """An RMS norm's per-dimension scale, read off the module itself: Llama's multiplies by its weight,
    Gemma 1-3's by ``1 + weight`` (its weight starts at zero), some by nothing. A vector of ones has
    a root mean square of 1, so the norm returns its scale divided by ``sqrt(1 + eps)``. Run on a
    float32 CPU copy (a bfloat16 output would round the scale)."""
    with torch.no_grad():
        out = copy.deepcopy(norm).float().cpu()(torch.ones(1, width))
    return _array(out[0]) * np.sqrt(1.0 + eps)


def _hf_final_norm(handle: ModelHandle) -> torch.nn.Module:
    """The final norm of a raw Hugging Face decoder: ``<base>.norm`` beside its ``<base>.layers``."""
    base = handle.layer_paths[0].rsplit(".", 2)[0] if handle.layer_paths else ""
    for name in ("norm", "final_layernorm", "ln_f"):
        try:
            return handle.module.get_submodule(f"{base}.{name}" if base else name)
        except AttributeError:
            continue
    raise DlmprobeInputError(f"cannot find the final norm of {handle.name!r} beside {base}.layers")


def readout_of(handle: ModelHandle) -> Readout:
    """The final norm and unembedding of a model: a TransformerLens one (built-in models, LLaDA, Dream,
    ...) or a raw Hugging Face one whose logits are ``lm_head(norm(last block))`` (Llama, Qwen2, ...)."""
    module = handle.module
    if handle.backend == "nnsight":
        lm_head = getattr(module, "lm_head", None)
        if not isinstance(lm_head, torch.nn.Linear):
            raise DlmprobeInputError(
                f"the logit lens reads a final norm then a linear lm_head; {type(module).__name__} ({handle.name!r}) "
                f"has none (a masked LM's prediction head sits between them): build a Readout by hand")
        return _norm_readout(_hf_final_norm(handle), _array(lm_head.weight).T, _array(lm_head.bias))
    if not (hasattr(module, "ln_final") and hasattr(module, "unembed")):
        raise DlmprobeInputError(
            f"the logit lens reads a TransformerLens model's ln_final and unembed; model {handle.name!r} has neither: "
            f"build a Readout from its final norm and unembedding by hand"
        )
    norm, unembed = _inner(module.ln_final), _inner(module.unembed)
    if not isinstance(unembed, torch.nn.Linear):
        raise DlmprobeInputError(f"expected a linear unembedding, got {type(unembed).__name__}")
    return _norm_readout(norm, _array(unembed.weight).T, _array(unembed.bias))


@dataclass(frozen=True)
class ModelReaders:
    """What a probe grid reads from the model beside its probes: the logit lens's :class:`Readout`
    and the token (and position) embedding of the ``embedding`` baseline; ``note`` says which is
    missing and why ("" when none is)."""

    readout: Readout | None = None
    embedding: Float[np.ndarray, "vocab d"] | None = None
    position_embedding: Float[np.ndarray, "pos d"] | None = None
    note: str = ""


def readers_of(handle: ModelHandle) -> ModelReaders:
    """The read-out and embeddings of a model; what cannot be read is named in ``note``, not raised."""
    notes = []
    try:
        readout = readout_of(handle)
    except DlmprobeInputError as err:
        readout = None
        notes.append(f"no logit lens: {err}")
    embed, pos = getattr(handle.module, "embed", None), getattr(handle.module, "pos_embed", None)
    if embed is None and handle.backend == "nnsight":
        embed = handle.module.get_input_embeddings()
    weight = getattr(_inner(embed), "weight", None) if embed is not None else None
    if weight is None:
        notes.append(f"no embedding baseline: model {handle.name!r} has no embed.weight")
    position = getattr(_inner(pos), "weight", None) if pos is not None else None  # None: rotary positions
    return ModelReaders(readout, _array(weight), _array(position), "; ".join(notes))


def native_readers(model: torch.nn.Module) -> ModelReaders:
    """DiffusionGemma's decoder read-out and token embedding: its logits are ``lm_head(decoder.norm(last
    decoder layer))`` (then a softcap, which keeps the argmax), its decoder's input the token embedding
    times its scale."""
    decoder, lm_head = model.model.decoder, model.lm_head
    readout = _norm_readout(decoder.norm, _array(lm_head.weight).T, _array(lm_head.bias))
    embed = decoder.embed_tokens
    return ModelReaders(readout, _array(embed.weight) * float(getattr(embed, "scalar_embed_scale", 1.0)))


def store_readers(data: ActivationDataset, handle: ModelHandle | None = None) -> ModelReaders:
    """The readers of the model a store was recorded from, loaded by the name it stored.

    A built-in checkpoint is used only if its weights match the store's recorded sha256; a Hugging
    Face model is loaded as the store recorded it (:func:`~dlmprobe.probes.features.store_handle`;
    ``handle``, if given, instead); a DiffusionGemma run (its own sampler) from the folder it names
    (:func:`native_readers`). Otherwise (a moved or retrained checkpoint, a model that no
    longer loads, a hand-built store) the readers are empty and ``note`` says why: pass
    :func:`readers_of` of the right model instead.
    """
    model = data.config.get("model") or {}
    if handle is None and (data.config.get("sampler") or {}).get("name") == "native":
        cache = data.config.get("cache") or {}
        try:
            native = load_native_model(str(model.get("name")), cache.get("device") or "cpu",
                                       cache.get("model_dtype") or "float32")
        except DlmprobeInputError as err:
            return ModelReaders(note=f"no logit lens or embedding baseline: {err}")
        return native_readers(native)
    if handle is not None or is_hf_store(data):
        try:
            return readers_of(handle or store_handle(data))
        except DlmprobeInputError as err:
            return ModelReaders(note=f"no logit lens or embedding baseline: cannot load model {model.get('name')!r} ({err})")
    name, recorded = model.get("name"), model.get("weights_sha256")
    if not name or not model.get("config"):
        return ModelReaders(note=f"no logit lens or embedding baseline: {data.path.name} names no built-in model")
    try:
        ckpt = load_model(name)
    except (FileNotFoundError, DlmprobeInputError, ValueError) as err:
        return ModelReaders(note=f"no logit lens or embedding baseline: cannot load model {name!r} ({err})")
    if recorded and ckpt.weights_sha256 != recorded:
        return ModelReaders(note=f"no logit lens or embedding baseline: the weights of {name!r} differ from those that wrote {data.path.name}")
    return readers_of(from_checkpoint(ckpt))


def lens_predictions(data: ActivationDataset, readout: Readout, site: str, step: int, rows: pd.DataFrame,
                     read_offset: int | None = None) -> Int[np.ndarray, " row"]:
    """The logit lens at ``site`` and ``step`` for each row, read at ``position + read_offset``.

    ``read_offset`` is the model's (``ModelHandle.read_offset``): -1 where the hidden state before
    a position predicts it (causal LMs, Dream); None: the one the store records (0 if none).
    """
    if read_offset is None:
        read_offset = int(data.config_entry("read_offset") or 0)
    acts = data.activations(site, step)  # (examples, stored positions, d)
    index = data.position_index(rows["position"].to_numpy() + read_offset)
    X = acts[rows["example"].to_numpy(), index]
    return readout.predict(X, exclude=[data.mask_id])


def model_readout(data: ActivationDataset, step: int, rows: pd.DataFrame) -> Int[np.ndarray, " row"]:
    """The model's own argmax at each row's position in the forward pass of ``step`` (-1 where none)."""
    if not 0 <= step < data.n_steps:
        raise DlmprobeInputError(f"the read-out exists for steps in [0, {data.n_steps}), got {step}")
    return data.prediction[rows["example"].to_numpy(), step, rows["position"].to_numpy()].astype(np.int64)


def lens_table(data: ActivationDataset, readout: Readout, label: str, step: int, sites: Sequence[str] | None = None,
               target: Literal["output", "truth"] = "output", only_masked: bool = True,
               read_offset: int | None = None) -> pd.DataFrame:
    """Per site: the logit lens's accuracy, the model's own read-out's and how often the two agree, on one row set.

    ``target`` is what a prediction must equal: the token finally committed (``output``) or the
    label's value (``truth``). The read-out does not depend on the site, so it repeats.
    ``read_offset``: as :func:`lens_predictions`'s.
    """
    if target not in ("output", "truth"):
        raise DlmprobeInputError(f"target must be 'output' or 'truth', got {target!r}")
    rows = label_rows(data, label, step, only_masked)
    y = rows[target].to_numpy()
    own = model_readout(data, step, rows)
    records = []
    for site in sites if sites is not None else data.sites:
        lens = lens_predictions(data, readout, site, step, rows, read_offset)
        records.append({
            "site": site, "layer": layer_of(site), "step": step, "label": label, "target": target, "n_rows": len(rows),
            "lens_accuracy": float((lens == y).mean()), "readout_accuracy": float((own == y).mean()),
            "lens_agrees_with_readout": float((lens == own).mean()),
        })
    return pd.DataFrame(records)
