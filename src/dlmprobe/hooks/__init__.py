"""Hooks that record a denoiser's activations at every timestep of sampling."""

from dlmprobe.hooks.recorder import ActivationRecorder, Capture
from dlmprobe.hooks.sites import NamesFilter, firing_hook_names, layer_of, resolve_sites

__all__ = ["ActivationRecorder", "Capture", "NamesFilter", "firing_hook_names", "layer_of", "resolve_sites"]
