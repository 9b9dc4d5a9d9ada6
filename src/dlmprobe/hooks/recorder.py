"""Record activations at every denoising step of a sampling run.

A diffusion LM's activations exist only inside a denoising step: the next step sees the canvas and
nothing else. So they must be recorded while sampling, one capture per forward pass. The recorder
is a step observer: the sampler tells it the step and the batch's rows before every forward pass.

Example:
    >>> with ActivationRecorder(ckpt.model, "blocks.*.hook_resid_post") as rec:
    ...     trajectory = generate(rec.model, task, examples, "diffusion", observers=[rec])
    ...     capture = rec.pop()     # capture.activations[site]: (batch, step, pos, d_model)

Two backends give the same numbers for the same model and input:

* ``"transformer_lens"``: hooks on a TransformerLens model's hook points, by hook name;
* ``"nnsight"``: any torch or Hugging Face module, addressed by module path (``layers.3``) through an
  nnsight trace; a site name may map to a path (``{"blocks.3.hook_resid_post": "layers.3"}``) so
  the stored names are TransformerLens names whatever the model.

No hook survives the ``with`` block, also when it raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks.sites import (
    NamesFilter,
    firing_hook_names,
    is_transformer_lens,
    main_output,
    resolve_sites,
)

Backend = Literal["auto", "transformer_lens", "nnsight"]
StepSelection = int | Sequence[int] | None


class _NNsightModel(torch.nn.Module):
    """Calls ``module`` inside an nnsight trace and saves the outputs of the requested paths."""

    def __init__(self, module: torch.nn.Module, paths: Mapping[str, str], recorder: ActivationRecorder):
        super().__init__()
        from nnsight import NNsight

        self.inner = module
        self._envoy = NNsight(module)
        order = {name: i for i, (name, _) in enumerate(module.named_modules())}
        unknown = [p for p in paths.values() if p not in order]
        if unknown:
            raise DlmprobeInputError(f"unknown module path {unknown[0]!r}: expected a path of this model such as "
                                     f"{', '.join(list(order)[1:5])}")
        # nnsight requires modules to be requested in execution order; registration order is that
        # order for the sequential stacks of transformers.
        self._paths = sorted(paths.items(), key=lambda item: order[item[1]])
        self._recorder = recorder

    def forward(self, tokens: Tensor) -> Any:
        saved: dict[str, Any] = {}
        with self._envoy.trace(tokens):
            for site, path in self._paths:
                saved[site] = main_output(self._envoy.get(path).output).save()
            output = self._envoy.output.save()
        for site, value in saved.items():
            self._recorder._capture(site, value)
        return output


@dataclass
class _Part:
    """The captures of one batch: its rows, the steps kept and, per site, one tensor per kept step."""

    rows: Tensor
    steps: list[int]
    buffers: dict[str, list[Tensor]]


class ActivationRecorder:
    """Captures the selected sites at the selected steps while attached (a ``with`` block).

    The sampler must be given the recorder as an observer (``generate(..., observers=[rec])``): it
    announces each step and the batch's rows before the forward pass, and nothing else tells the
    recorder which step a forward pass belongs to. A site firing with no step announced is an error.

    Args:
        model: a TransformerLens model (hook names) or any torch module (nnsight backend).
        sites: hook names / globs / predicate (TransformerLens), or module paths (a list, or a
            mapping from the name to store to the module path) for the nnsight backend.
        steps: steps to keep: None = all, an int k = every k-th (0, k, 2k, ...), or a list.
        positions: canvas positions to keep (None = all). Slicing here keeps memory small.
        dtype, device: how captures are stored (detached, float32 on CPU by default).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sites: NamesFilter | Mapping[str, str],
        *,
        backend: Backend = "auto",
        steps: StepSelection = None,
        positions: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        if backend == "auto":
            backend = "transformer_lens" if is_transformer_lens(model) else "nnsight"
        if backend not in ("transformer_lens", "nnsight"):
            raise DlmprobeInputError(f"backend must be 'auto', 'transformer_lens' or 'nnsight', got {backend!r}")
        if backend == "transformer_lens" and not is_transformer_lens(model):
            raise DlmprobeInputError(f"the transformer_lens backend needs a TransformerLens model, "
                                     f"got {type(model).__name__}")
        self.backend = backend
        self._target = model
        if backend == "transformer_lens":
            if isinstance(sites, Mapping):
                raise DlmprobeInputError("a mapping of sites to module paths is for the nnsight backend, "
                                         "got one with the transformer_lens backend")
            self.sites = resolve_sites(sites, firing_hook_names(model))
            self._paths: dict[str, str] = {}
        else:
            if callable(sites) and not isinstance(sites, Mapping):
                raise DlmprobeInputError("the nnsight backend takes module paths (a list or a name -> path "
                                         "mapping), got a predicate")
            paths = dict(sites) if isinstance(sites, Mapping) else {p: p for p in ([sites] if isinstance(sites, str) else sites)}
            if not paths:
                raise DlmprobeInputError("no sites given: expected at least one module path")
            self._paths = paths
            self.sites = list(paths)
        if isinstance(steps, int) and not isinstance(steps, bool):
            if steps < 1:
                raise DlmprobeInputError(f"steps as an int means every k-th step and must be >= 1, got {steps}")
        elif steps is not None and any(int(s) < 0 for s in steps):
            raise DlmprobeInputError(f"step indices must be >= 0, got {list(steps)}")
        self._steps = steps
        self._positions = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
        self._window = _as_slice(self._positions)
        self.dtype, self.device = dtype, torch.device(device)
        self._stack: ExitStack | None = None
        self.model: torch.nn.Module = model
        self._reset()

    # -- steps and capture ---------------------------------------------------------------------
    def _reset(self) -> None:
        self._parts: list[_Part] = []
        self._step: int | None = None

    def _keep(self, step: int) -> bool:
        if self._steps is None:
            return True
        if isinstance(self._steps, int):
            return step % self._steps == 0
        return step in self._steps

    def begin_step(self, step: int, rows: Int[Tensor, " batch"], canvas: Tensor) -> None:
        """Called by the sampler before each forward pass: the step and the batch's example indices."""
        part = self._parts[-1] if self._parts else None
        # A new batch, or the same rows sampled again: a new part.
        if part is None or not torch.equal(part.rows, rows) or (self._step is not None and step <= self._step):
            part = _Part(rows.clone(), [], {site: [] for site in self.sites})
            self._parts.append(part)
        self._step = step
        if self._keep(step):
            part.steps.append(step)

    def _capture(self, site: str, value: Tensor) -> None:
        if self._step is None:
            raise RuntimeError("the recorder saw a forward pass with no step announced: sample with "
                               "generate(..., observers=[recorder]) or call recorder.begin_step first")
        if not self._keep(self._step):
            return
        value = value.detach()
        if self._window is not None:  # a view: the conversion below is the one copy
            value = value[:, self._window]
        elif self._positions is not None:
            value = value[:, self._positions.to(value.device)]
        # Converted where it was computed, then moved: a GPU sends the smaller dtype over the bus.
        self._parts[-1].buffers[site].append(value.to(self.dtype, copy=True).to(self.device))

    def _hook_fns(self) -> list[tuple[str, Any]]:
        def make(site: str):
            def hook(activation: Tensor, hook: Any) -> None:
                self._capture(site, activation)
            return hook

        return [(site, make(site)) for site in self.sites]

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this recorder is already attached")
        self._reset()
        stack = ExitStack()
        try:
            if self.backend == "transformer_lens":
                stack.enter_context(self._target.hooks(fwd_hooks=self._hook_fns()))
                self.model = self._target
            else:
                self.model = _NNsightModel(self._target, self._paths, self)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        self.model = self._target
        if stack is not None:
            stack.close()

    def pop(self) -> Capture:
        """The captures since the last ``pop`` (or attach), batches concatenated in the order sampled."""
        if not self._parts or not any(part.steps for part in self._parts):
            raise RuntimeError("nothing was recorded: the model was not called while the recorder was attached")
        for part in self._parts:
            missing = [s for s, b in part.buffers.items() if len(b) != len(part.steps)]
            if missing:
                raise RuntimeError(f"site {missing[0]!r} did not fire once at every step")
        steps = self._parts[0].steps
        if any(part.steps != steps for part in self._parts):
            raise RuntimeError(f"the batches recorded different steps: {[part.steps for part in self._parts]}")
        capture = Capture(
            {site: _cat([torch.stack(part.buffers[site], dim=1) for part in self._parts]) for site in self.sites},
            list(steps), torch.cat([part.rows for part in self._parts]),
        )
        self._reset()
        return capture


def _as_slice(positions: Tensor | None) -> slice | None:
    """``positions`` as a slice when they are one contiguous increasing run, else None."""
    if positions is None or len(positions) == 0:
        return None
    first = int(positions[0])
    if torch.equal(positions, torch.arange(first, first + len(positions))):
        return slice(first, first + len(positions))
    return None


def _cat(tensors: list[Tensor]) -> Tensor:
    """Concatenated along the batch axis; one tensor is returned as it is, not copied."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@dataclass
class Capture:
    """Activations of one sampling run: ``activations[site]`` is (batch, step, pos, d), ``steps[i]``
    is the denoising step that axis 1 index ``i`` came from and ``rows[b]`` the index (in the
    ``generate`` call) of the example at axis 0 index ``b``."""

    activations: dict[str, Float[Tensor, "batch step pos d"]]
    steps: list[int]
    rows: Int[Tensor, " batch"]
