"""Fixtures every test module may use. The shared configurations and builders are plain
functions in tiny.py (importable by helpers too); here only what pytest injects."""
import pytest

from tiny import TINY, tiny_model


@pytest.fixture(scope="module")
def model(request):
    """The module's random model: its ``MODEL`` config (default TINY) with its ``SEED``
    (default 3), fp32 on the CPU. A module that needs another device or dtype defines its own."""
    return tiny_model(getattr(request.module, "MODEL", TINY), getattr(request.module, "SEED", 3))
