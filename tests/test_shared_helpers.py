"""The low-level helpers that used to be written several times: the weights checksum
(:func:`keyprep.pipeline.weights.sha256_file`) and the mask clean-up of
:mod:`keyprep.pipeline.masks` (largest component, holes filled)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from keyprep.pipeline.masks import fill_holes, largest_component, largest_component_filled
from keyprep.pipeline.weights import sha256_file


def test_sha256_of_a_known_byte_string(tmp_path):
    path = tmp_path / 'w.pt'
    path.write_bytes(b'abc')  # FIPS 180-2 test vector
    assert sha256_file(path) == ('ba7816bf8f01cfea414140de5dae2223'
                                 'b00361a396177a9cb410ff61f20015ad')
    path.write_bytes(b'')
    assert sha256_file(str(path)) == ('e3b0c44298fc1c149afbf4c8996fb924'
                                      '27ae41e4649b934ca495991b7852b855')


def test_sha256_of_a_file_larger_than_one_block(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000  # 1.28 MB: two 1 MiB blocks
    (tmp_path / 'big').write_bytes(data)
    assert sha256_file(tmp_path / 'big') == hashlib.sha256(data).hexdigest()


def _two_components_and_a_hole():
    m = np.zeros((12, 12, 12), bool)
    m[1:7, 1:7, 1:7] = True   # 216 voxels ...
    m[3, 3, 3] = False        # ... with a hole (215 left)
    m[9:11, 9:11, 9:11] = True  # a small component (8 voxels)
    return m


def test_largest_component_filled():
    m = _two_components_and_a_hole()
    out = largest_component_filled(m)
    expected = np.zeros_like(m)
    expected[1:7, 1:7, 1:7] = True
    assert out.dtype == bool and np.array_equal(out, expected)
    assert np.array_equal(largest_component_filled(m, fill_first=True), expected)
    assert int(largest_component(m).sum()) == 215  # not filled


def test_the_order_of_the_two_steps_is_a_parameter():
    """A hollow box (488 voxels, 1000 with its cavity) and a solid blob (729): the blob is
    the largest component as it is, the box once filled (``fill_first``)."""
    m = np.zeros((25, 12, 12), bool)
    m[1:11, 1:11, 1:11] = True
    m[2:10, 2:10, 2:10] = False
    m[13:22, 1:10, 1:10] = True
    box, blob = np.zeros_like(m), np.zeros_like(m)
    box[1:11, 1:11, 1:11] = True
    blob[13:22, 1:10, 1:10] = True
    assert np.array_equal(largest_component_filled(m), blob)
    assert np.array_equal(largest_component_filled(m, fill_first=True), box)


def test_ties_go_to_the_first_component():
    m = np.zeros((5, 5, 9), bool)
    m[1:3, 1:3, 1:3] = True
    m[1:3, 1:3, 5:7] = True  # same size, later in C order
    out = largest_component(m)
    assert out[1, 1, 1] and not out[1, 1, 5]


def test_one_or_no_component_is_returned_as_booleans():
    assert not largest_component(np.zeros((4, 4, 4), np.uint8)).any()
    one = np.zeros((4, 4, 4), np.uint8)
    one[1:3, 1:3, 1:3] = 1
    out = largest_component(one)
    assert out.dtype == bool and int(out.sum()) == 8
    assert not largest_component_filled(np.zeros((4, 4, 4), bool)).any()


@pytest.mark.parametrize('shape', [(9, 10, 11), (1, 6, 6), (2, 2, 2), (20, 3, 17)])
def test_fill_holes_equals_scipy(shape):
    """The fast filling gives scipy's ``binary_fill_holes`` exactly (the helper replaced
    scipy's in three places)."""
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7, 0.85):
        for _ in range(20):
            m = rng.random(shape) < density
            assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))


def test_fill_holes_per_axial_slice():
    """A tube along the last axis has no 3-D hole (open at both ends) but a hole in every
    axial slice."""
    m = np.zeros((7, 7, 6), bool)
    m[1:6, 1:6, :] = True
    m[3, 3, :] = False
    assert not fill_holes(m)[3, 3, 2]
    assert fill_holes(m, axial=True)[3, 3, :].all()
