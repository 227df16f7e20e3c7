"""Shared fixtures. ``one_thread``: one torch thread for a test (tiny tensors, shared CI cores);
modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.

A module whose tests (or fixtures, module-scoped ones included) leave torch's thread count
changed fails in its last test's teardown: a stray ``torch.set_num_threads(1)`` once ran every
later module, the end-to-end suite runs included, on one of CI's two cores."""

import os
from collections.abc import Generator, Iterator

import pytest
import torch

# Hermetic tests: no developer's user-model registry (~/.config/genbench/models.json or a
# $GENBENCH_MODELS of their own) enters the zoo's lookup; tests that register models set it.
os.environ["GENBENCH_MODELS"] = ""

from tests.toys import single_thread

_THREADS = torch.get_num_threads()


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, None, None]:
    yield  # the test's own fixtures are torn down first
    if nextitem is not None and nextitem.module is item.module:
        return  # a module-scoped fixture may hold one thread until the module's last test
    threads = torch.get_num_threads()
    if threads != _THREADS:
        torch.set_num_threads(_THREADS)
        raise AssertionError(
            f"{item.nodeid} (or a fixture it uses) left torch.get_num_threads() at {threads} "
            f"(the session started with {_THREADS}): wrap the code in "
            "tests.toys.single_thread() or use the one_thread fixture")
