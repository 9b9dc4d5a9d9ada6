"""dlmprobe: a probe kit for the planning and reasoning of diffusion language models.

The data flows one way, and a module imports only from stages before it: ``dlmprobe.tasks`` ->
``dlmprobe.models`` -> ``dlmprobe.sampling`` (+ ``dlmprobe.hooks``) -> ``dlmprobe.store`` (HDF5)
-> ``dlmprobe.capture`` -> ``dlmprobe.probes`` -> ``dlmprobe.analyses`` -> ``dlmprobe.report`` /
``dlmprobe.demo`` / ``dlmprobe.cli``. ``dlmprobe.datasets`` re-exports the tasks and the store.
"""

__version__ = "0.1.0"
