"""Edit a site's activations while sampling: from a start step on, at chosen (row, position) pairs.

The editor is scoped like the recorder (a ``with`` block; no hook survives it, also when it raises)
and is a step observer: the sampler tells it the step, the batch's rows (indices of its examples in
the ``generate`` call) and the canvas the step reads before every forward pass, so it knows which
rows it is editing without counting forward passes.

Example:
    >>> where = torch.zeros((len(examples), task.sequence_length), dtype=torch.bool)
    >>> where[:, task.target_start :] = True
    >>> with ActivationEditor(ckpt.model, "blocks.3.hook_resid_post", lambda h, rows, pos: h * 0, where,
    ...                       start_step=9, mask_id=task.vocab.mask_id) as editor:
    ...     trajectory = generate(ckpt.model, task, examples, "diffusion", observers=[editor])

Two backends:

* ``"transformer_lens"``: a hook on a TransformerLens model's hook point, by hook name;
* ``"module"``: a torch forward hook on any module, by module path (``layers.3``); a module that
  returns a tuple (older Hugging Face decoder layers) has its first element edited.

Given a :class:`ModelHandle` the editor attaches to ``handle.module``: by hook name for a
TransformerLens handle, by the module path ``handle.site_paths[site]`` otherwise, so ``site`` is
the stored site name (``blocks.3.hook_resid_post``) for every model. A forward pass over ``n``
positions (a KV-cached autoregressive step) edits the last ``n`` positions of the canvas the step
reads.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, Literal, Self

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks.sites import is_transformer_lens, main_output
from dlmprobe.models.handle import ModelHandle

# The activations at the selected pairs, each pair's row (its example's index in the generate call)
# and canvas position -> their new values.
Edit = Callable[[Float[Tensor, "pair ..."], Int[Tensor, " pair"], Int[Tensor, " pair"]], Float[Tensor, "pair ..."]]
EditorBackend = Literal["auto", "transformer_lens", "module"]


class ActivationEditor:
    """Replaces the activations of ``site`` at selected (row, position) pairs while attached.

    At step ``s`` of a batch with rows ``r``, the pairs ``(r[b], p)`` with ``where[r[b], p]`` and
    ``s >= start_step[r[b]]`` (and, if ``mask_id`` is given, ``p`` still masked in the canvas the step
    reads) go through ``edit``, all of the batch's pairs in one call. The site's activation must be
    laid out (batch, pos, ...), as TransformerLens' residual, MLP and per-head (``hook_z``) sites are.

    Args:
        model: a :class:`ModelHandle` (``site`` a site name), a TransformerLens model (``site`` a
            hook name) or any torch module (``site`` a module path).
        site: the site name, hook name or module path to edit.
        edit: ``edit(h, rows, positions)``: the new values of the pairs' activations ``h`` (pair, ...).
        where: (example, pos) the pairs that may be edited, for every example of the ``generate`` call.
        start_step: the first step edited: one for all rows, or one per example (example,).
        mask_id: edit only positions still holding this token in the canvas the step reads.
        backend: ``"auto"`` picks ``"transformer_lens"`` for a TransformerLens model, else ``"module"``.
    """

    def __init__(
        self,
        model: ModelHandle | torch.nn.Module,
        site: str,
        edit: Edit,
        where: Bool[Tensor, "example pos"],
        *,
        start_step: int | Int[Tensor, " example"] = 0,
        mask_id: int | None = None,
        backend: EditorBackend = "auto",
    ):
        if isinstance(model, ModelHandle):
            if model.backend != "transformer_lens":
                if site not in model.site_paths:
                    raise DlmprobeInputError(f"unknown site {site!r}: expected a site of this model such as "
                                             f"{list(model.site_paths)[-1]}")
                site, backend = model.site_paths[site], "module"
            model = model.module
        if backend == "auto":
            backend = "transformer_lens" if is_transformer_lens(model) else "module"
        if backend == "transformer_lens":
            if not is_transformer_lens(model):
                raise DlmprobeInputError(f"the transformer_lens backend needs a TransformerLens model, "
                                         f"got {type(model).__name__}")
            if site not in model.hook_dict:
                raise DlmprobeInputError(f"unknown site {site!r}: expected a hook name of this model such as "
                                         f"blocks.0.hook_resid_post")
        elif backend == "module":
            modules = dict(model.named_modules())
            if site not in modules:
                raise DlmprobeInputError(f"unknown module path {site!r}: expected a path of this model such as "
                                         f"{', '.join(list(modules)[1:5])}")
        else:
            raise DlmprobeInputError(f"backend must be 'auto', 'transformer_lens' or 'module', got {backend!r}")
        if where.dtype != torch.bool or where.dim() != 2:
            raise DlmprobeInputError(f"where must be a bool tensor (example, pos), got {where.dtype} of shape "
                                     f"{tuple(where.shape)}")
        start = torch.as_tensor(start_step, dtype=torch.long)
        start = start.expand(len(where)) if start.dim() == 0 else start
        if start.shape != (len(where),):
            raise DlmprobeInputError(f"start_step must be an int or one step per example ({len(where)}), "
                                     f"got shape {tuple(start.shape)}")
        self.backend, self.site, self.edit, self.where, self.start_step = backend, site, edit, where.cpu(), start.cpu()
        self.mask_id = mask_id
        self._target = model
        self._stack: ExitStack | None = None
        self._step: tuple[int, Tensor, Tensor] | None = None

    def begin_step(self, step: int, rows: Int[Tensor, " batch"], canvas: Int[Tensor, "batch pos"]) -> None:
        """Called by the sampler before each forward pass."""
        if len(rows) and int(rows.max()) >= len(self.where):
            raise DlmprobeInputError(f"the sampler's rows go up to {int(rows.max())} but where covers "
                                     f"{len(self.where)} examples")
        self._step = (step, rows.cpu(), canvas)

    def _apply(self, activation: Tensor) -> Tensor:
        if self._step is None:
            raise RuntimeError("the editor saw a forward pass with no step announced: sample with "
                               "generate(..., observers=[editor])")
        step, rows, canvas = self._step
        # The pass computes the last n_pos positions of the canvas the step reads (all of them
        # unless a KV cache holds the ones before).
        stop = canvas.shape[1]
        first = stop - activation.shape[1]
        selected = self.where[rows, first:stop] & (self.start_step[rows] <= step).unsqueeze(1)
        if self.mask_id is not None:
            selected &= (canvas[:, first:stop] == self.mask_id).cpu()
        batch, position = selected.nonzero(as_tuple=True)
        if batch.numel() == 0:
            return activation
        batch, position = batch.to(activation.device), position.to(activation.device)
        edited = activation.clone()
        edited[batch, position] = self.edit(activation[batch, position], rows.to(activation.device)[batch], position + first)
        return edited

    def _module_hook(self, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        hidden = main_output(output)
        edited = self._apply(hidden)
        if edited is hidden:
            return None
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this editor is already attached")
        self._step = None
        stack = ExitStack()
        if self.backend == "transformer_lens":
            stack.enter_context(self._target.hooks(fwd_hooks=[(self.site, lambda act, hook: self._apply(act))]))
        else:
            handle = self._target.get_submodule(self.site).register_forward_hook(self._module_hook)
            stack.callback(handle.remove)
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        self._step = None
        if stack is not None:
            stack.close()
