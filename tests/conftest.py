"""Shared fixtures; the helpers they use are in helpers.py."""
from __future__ import annotations

import pytest

from helpers import make_dataset, tiny_bundle


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    """The tiny bundle (untrained student, tiny random CLIP teacher), built once per session."""
    return tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def service(bundle_dir):
    """The app's plain-function layer on the tiny bundle."""
    from clipteacher.app import service as svc
    from clipteacher.runtime import Bundle

    return svc.Service(Bundle(bundle_dir, verbose=False))
