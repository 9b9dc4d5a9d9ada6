"""Linear probes that decode planned answers and goals before they are unmasked, with controls."""

from dlmprobe.probes.clock import clock_table
from dlmprobe.probes.grid import ProbeGrid
from dlmprobe.probes.linear import LinearProbe, fit_logistic

__all__ = ["LinearProbe", "ProbeGrid", "clock_table", "fit_logistic"]
