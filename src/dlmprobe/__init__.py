"""dlmprobe: a probe kit for the planning and reasoning of diffusion language models.

The data flows one way: tasks (``dlmprobe.datasets``) -> models -> sampling (+ ``dlmprobe.hooks``)
-> HDF5 store -> ``dlmprobe.probes`` -> ``dlmprobe.analyses`` -> report / CLI.
"""

__version__ = "0.1.0"
