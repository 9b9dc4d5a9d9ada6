import pytest
import torch

# dlmprobe's test models are tiny: one thread is as fast, and more threads than free cores (another
# job on a shared CI machine) slow torch's small operations down by an order of magnitude.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config():
    """A two-layer, 32-wide model on the smallest arithmetic task: builds in milliseconds."""
    from dlmprobe.models import ModelConfig

    return ModelConfig(task="arith", task_params={"n_ops": 3}, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
