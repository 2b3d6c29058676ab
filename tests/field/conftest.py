"""Fixtures of the field-case tests: the small model, data and profile files in tmp_path."""

from __future__ import annotations

import shutil

import pytest
from field import support


@pytest.fixture
def small_files(tmp_path, tmp_path_factory):
    """Return (model file, data file, profile file) of the small CNN under ``tmp_path``.

    The profile already holds the entries a ``support.small_config()`` run needs.
    """
    model, data, profile = support.small_files_in(tmp_path)
    shutil.copyfile(support.measured_profile(tmp_path_factory), profile)
    return model, data, profile
