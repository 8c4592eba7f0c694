"""Doctest namespace for the package's docstring examples."""

import os

import nibabel as nb
import numpy as np
import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace, tmp_path):
    doctest_namespace['tmp_path'] = tmp_path
    doctest_namespace['np'] = np
    doctest_namespace['nb'] = nb
