"""Where the tests run. They are CPU tests (CI has no GPU), written for float32 results on the CPU; on a
machine with a GPU, `--device auto` would train them in bf16 there and their tolerances would not hold. So
GPUs are hidden from every test and its subprocesses, and the results do not depend on the machine.

`pytest --gpu` runs the GPU checks instead: only the tests that take the `device` fixture, on CUDA. Tests
that compare two runs to rounding train them in float32 there too; the others run as a user's run would,
in bf16 autocast, and say how close that must come."""

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gpu", action="store_true", help="run only the tests that take the `device` fixture, on CUDA (GPU checks)"
    )


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA; subprocesses inherit it
        return
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError("--gpu: no CUDA device is visible")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--gpu"):
        return
    checks, cpu_only = [], []
    for item in items:
        (checks if "device" in getattr(item, "fixturenames", ()) else cpu_only).append(item)
    config.hook.pytest_deselected(items=cpu_only)
    items[:] = checks


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """'cpu', or 'cuda' under `pytest --gpu`: the device the test trains and compares on."""
    return "cuda" if request.config.getoption("--gpu") else "cpu"
