"""Record activations at every forward pass of a sampling run.

A diffusion LM's activations exist only inside a denoising step: the next step sees the canvas and
nothing else. So they must be recorded while sampling, one capture per forward pass.

Example:
    >>> with ActivationRecorder(ckpt.model, "blocks.*.hook_resid_post") as rec:
    ...     trajectory = generate(rec.model, task, examples, "diffusion")
    ...     capture = rec.pop()     # capture.activations[site]: (batch, step, pos, d_model)

Two backends give the same numbers for the same model and input:

* ``"transformer_lens"``: hooks on a TransformerLens model's hook points, by hook name;
* ``"nnsight"``: any torch or Hugging Face module, addressed by module path (``layers.3``) through an
  nnsight trace; a site name may map to a path (``{"blocks.3.hook_resid_post": "layers.3"}``) so
  the stored names are TransformerLens names whatever the model.

No hook survives the ``with`` block, also when it raises.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dlmprobe.hooks.sites import NamesFilter, firing_hook_names, resolve_sites

Backend = Literal["auto", "transformer_lens", "nnsight"]
StepSelection = int | Sequence[int] | None


def _is_transformer_lens(model: torch.nn.Module) -> bool:
    return hasattr(model, "hooks") and hasattr(model, "hook_dict")


def _main_output(value: Any) -> Tensor:
    # Hugging Face decoder layers return tuples in older transformers and tensors in 5.x: taking
    # [0] of a tensor would silently keep batch row 0.
    if isinstance(value, (tuple, list)):
        return value[0]
    return value


def _logits(value: Any) -> Tensor:
    return value.logits if hasattr(value, "logits") else _main_output(value)


class _NNsightModel(torch.nn.Module):
    """Calls ``module`` inside an nnsight trace and saves the outputs of the requested paths."""

    def __init__(self, module: torch.nn.Module, paths: Mapping[str, str], recorder: "ActivationRecorder"):
        super().__init__()
        from nnsight import NNsight

        self.inner = module
        self._envoy = NNsight(module)
        order = {name: i for i, (name, _) in enumerate(module.named_modules())}
        unknown = [p for p in paths.values() if p not in order]
        if unknown:
            raise ValueError(f"unknown module path {unknown[0]!r}: expected a path of this model such as "
                             f"{', '.join(list(order)[1:5])}")
        # nnsight requires modules to be requested in execution order; registration order is that
        # order for the sequential stacks of transformers.
        self._paths = sorted(paths.items(), key=lambda item: order[item[1]])
        self._recorder = recorder

    def forward(self, tokens: Tensor) -> Tensor:
        saved: dict[str, Any] = {}
        with self._envoy.trace(tokens):
            for site, path in self._paths:
                saved[site] = _main_output(self._envoy.get(path).output).save()
            output = self._envoy.output.save()
        for site, value in saved.items():
            self._recorder._capture(site, value)
        self._recorder._end_forward()
        return _logits(output)


class ActivationRecorder:
    """Captures the selected sites at the selected forward passes while attached (a ``with`` block).

    Args:
        model: a TransformerLens model (hook names) or any torch module (nnsight backend).
        sites: hook names / globs / predicate (TransformerLens), or module paths (a list, or a
            mapping from the name to store to the module path) for the nnsight backend.
        steps: forward passes to keep: None = all, an int k = every k-th (0, k, 2k, ...), or a list.
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
            backend = "transformer_lens" if _is_transformer_lens(model) else "nnsight"
        if backend not in ("transformer_lens", "nnsight"):
            raise ValueError(f"backend must be 'auto', 'transformer_lens' or 'nnsight', got {backend!r}")
        if backend == "transformer_lens" and not _is_transformer_lens(model):
            raise ValueError(f"the transformer_lens backend needs a TransformerLens model, got {type(model).__name__}")
        self.backend = backend
        self._target = model
        if backend == "transformer_lens":
            if isinstance(sites, Mapping):
                raise ValueError("a mapping of sites to module paths is for the nnsight backend")
            self.sites = resolve_sites(sites, firing_hook_names(model))
            self._paths: dict[str, str] = {}
        else:
            if callable(sites) and not isinstance(sites, Mapping):
                raise ValueError("the nnsight backend takes module paths (a list or a name -> path mapping), not a predicate")
            paths = dict(sites) if isinstance(sites, Mapping) else {p: p for p in ([sites] if isinstance(sites, str) else sites)}
            if not paths:
                raise ValueError("no sites given: expected at least one module path")
            self._paths = paths
            self.sites = list(paths)
        if isinstance(steps, int) and not isinstance(steps, bool):
            if steps < 1:
                raise ValueError(f"steps as an int means every k-th step and must be >= 1, got {steps}")
        elif steps is not None and any(int(s) < 0 for s in steps):
            raise ValueError(f"step indices must be >= 0, got {list(steps)}")
        self._steps = steps
        self._positions = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
        self.dtype, self.device = dtype, torch.device(device)
        self._stack: ExitStack | None = None
        self.model: torch.nn.Module = model
        self._reset()

    # -- capture -------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._calls = 0
        self._buffers: dict[str, list[Tensor]] = {site: [] for site in self.sites}
        self.recorded_steps: list[int] = []

    def _keep(self, call: int) -> bool:
        if self._steps is None:
            return True
        if isinstance(self._steps, int):
            return call % self._steps == 0
        return call in self._steps

    def _capture(self, site: str, value: Tensor) -> None:
        if not self._keep(self._calls):
            return
        value = value.detach()
        if self._positions is not None:
            value = value[:, self._positions.to(value.device)]
        self._buffers[site].append(value.to(self.device, self.dtype))

    def _end_forward(self) -> None:
        if self._keep(self._calls):
            self.recorded_steps.append(self._calls)
        self._calls += 1

    def _hook_fns(self) -> list[tuple[str, Any]]:
        last = self.sites[-1]

        def make(site: str):
            def hook(activation: Tensor, hook: Any) -> None:
                self._capture(site, activation)
                if site == last:
                    self._end_forward()
            return hook

        return [(site, make(site)) for site in self.sites]

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationRecorder":
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

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        self.model = self._target
        if stack is not None:
            stack.close()

    def pop(self) -> "Capture":
        """The captures since the last ``pop`` (or attach), and a reset of the step counter."""
        missing = [s for s, b in self._buffers.items() if len(b) != len(self.recorded_steps)]
        if missing:
            raise RuntimeError(f"site {missing[0]!r} did not fire on every forward pass")
        if not self.recorded_steps:
            raise RuntimeError("nothing was recorded: the model was not called while the recorder was attached")
        capture = Capture({site: torch.stack(buf, dim=1) for site, buf in self._buffers.items()},
                          list(self.recorded_steps))
        self._reset()
        return capture


@dataclass
class Capture:
    """Activations of one sampling run: ``activations[site]`` is (batch, step, pos, d) and
    ``steps[i]`` is the forward pass (denoising step) that axis 1 index ``i`` came from."""

    activations: dict[str, Float[Tensor, "batch step pos d"]]
    steps: list[int]
