"""Binary mask clean-up shared by skull stripping, the label network and the atlas builders.

Connectivity is the face (6-) neighbourhood in 3-D throughout, as ``scipy.ndimage``'s
default, for both the foreground components and the background in hole filling.

>>> import numpy as np
>>> m = np.zeros((7, 7, 7), bool)
>>> m[1:5, 1:5, 1:5] = True; m[2, 2, 2] = False  # a cube with a hole
>>> m[6, 6, 6] = True                            # and a stray voxel
>>> out = largest_component_filled(m)
>>> int(out.sum()), bool(out[2, 2, 2]), bool(out[6, 6, 6])
(64, True, False)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ['fill_holes', 'largest_component', 'largest_component_filled']


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (boolean). Ties go to the component
    met first in C order (the lowest label of ``scipy.ndimage.label``); a mask with at most
    one component is returned as it is (as booleans)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray, axial: bool = False) -> np.ndarray:
    """Fill the holes of a 3-D mask: background components (6-connected) that do not touch
    the array's border. Equal to ``scipy.ndimage.binary_fill_holes`` and faster. With
    ``axial``, each axial slice (the last axis) is filled on its own (4-connected in the
    slice): a cavity open above or below, a nose or an ear canal, is filled where a slice
    encloses it."""
    mask = np.asarray(mask, bool)
    if axial:
        struct = np.zeros((3, 3, 3), bool)
        struct[:, :, 1] = ndi.generate_binary_structure(2, 1)
    else:
        struct = ndi.generate_binary_structure(3, 1)
    lab, n = ndi.label(~mask, structure=struct)
    if n == 0:
        return mask.copy()
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1]]
    if not axial:
        faces += [lab[:, :, 0], lab[:, :, -1]]
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    keep = np.zeros(n + 1, bool)
    keep[border] = True
    keep[0] = False
    return mask | ~keep[lab] & (lab > 0)


def largest_component_filled(mask: np.ndarray, *, fill_first: bool = False) -> np.ndarray:
    """The largest connected component of ``mask`` with its holes filled.

    ``fill_first=False`` (skull-stripping masks, the label network's head and brain):
    the largest component, then its holes filled. ``fill_first=True`` (the atlas builders of
    :mod:`keyprep.pipeline.synth.anatomies`): holes filled first, so a component is
    measured with the cavities it encloses (and pieces lying inside another's holes merge
    into it), then the largest kept.
    """
    if fill_first:
        return largest_component(fill_holes(mask))
    return fill_holes(largest_component(mask))
