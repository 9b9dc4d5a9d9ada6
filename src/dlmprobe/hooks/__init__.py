"""Hooks that record or edit a model's activations at every step of sampling."""

from dlmprobe.hooks.editor import ActivationEditor, Edit
from dlmprobe.hooks.recorder import ActivationRecorder, Capture
from dlmprobe.hooks.sites import NamesFilter, firing_hook_names, layer_of, resolve_sites

__all__ = [
    "ActivationEditor",
    "ActivationRecorder",
    "Capture",
    "Edit",
    "NamesFilter",
    "firing_hook_names",
    "layer_of",
    "resolve_sites",
]
