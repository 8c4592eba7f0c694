"""Reportlets: PNG figures for the HTML QC reports, in the visual language of NiPreps.

Every ``plot_*`` function reads NIfTI files, writes one PNG and returns its path. Slice
figures have a black background, no axes, and mosaics of slices through the extent of the
brain (rows of axial, coronal and sagittal slices), about 1400 px wide at 100 dpi. Images
are reoriented to the closest canonical (RAS+) orientation on loading and displayed with
the aspect ratio of their voxel sizes, in neurological convention (left on the left of
axial and coronal slices, anterior on the right of sagittal slices). An overlay (mask,
labels) that is not on the grid of its background image is resampled onto it through the
affines (nearest neighbour).

Matplotlib is imported inside the functions (with the ``Agg`` backend) so that importing
this module stays light.

Modules: :mod:`._common` (loading, slices, mosaic layout, saving), :mod:`.anatomy` (mask and
label overlays), :mod:`.registration` (before/after, variants), :mod:`.jacobian`,
:mod:`.keypoints`, :mod:`.plots` (QC numbers per engine and structure). Every public name is
importable from this package.
"""

from __future__ import annotations

from ._common import (
    EDGE_COLOR,
    FOLDING_COLOR,
    MASK_COLOR,
    VIEWS,
    png_to_data_uri,
    select_slices,
)
from .anatomy import plot_labels, plot_mask
from .jacobian import linear_jacobian_text, plot_jacobian
from .keypoints import PAIR_COLOURS, keypoint_colours, plot_keypoints, select_pairs
from .plots import plot_group, plot_structure_dice
from .registration import plot_registration, plot_variants

__all__ = [
    'EDGE_COLOR',
    'FOLDING_COLOR',
    'MASK_COLOR',
    'PAIR_COLOURS',
    'VIEWS',
    'keypoint_colours',
    'linear_jacobian_text',
    'plot_group',
    'plot_jacobian',
    'plot_keypoints',
    'plot_labels',
    'plot_mask',
    'plot_registration',
    'plot_structure_dice',
    'plot_variants',
    'select_pairs',
    'png_to_data_uri',
    'select_slices',
]
