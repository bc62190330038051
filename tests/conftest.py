"""Shared fixtures; the helpers they use are in helpers.py."""
from __future__ import annotations

import pytest

from helpers import make_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")
