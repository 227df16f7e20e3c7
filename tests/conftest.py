"""Shared fixtures. ``one_thread``: one torch thread for a test (tiny tensors, shared CI cores);
modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""

from collections.abc import Iterator

import pytest

from tests.toys import single_thread


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield
