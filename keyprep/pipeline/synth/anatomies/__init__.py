"""Extra anatomies for the synthesis engine, from files that install offline.

SynthSeg's 16 training label maps are the main material of keyprep's synthesis engine, but
they are not on a user's machine. This module builds three more label maps, in the same
*generation* label space (:data:`~keyprep.pipeline.synth.labels.GENERATION_LABELS`), from
files that a user's machine does have:

* **Colin27** (Debian ``mricron-data``: ``ch2``, ``ch2bet``, ``aal``): AAL's cortical and
  deep grey-matter regions, a three-class tissue segmentation of the ch2 T1 inside the
  ch2bet brain (white matter, CSF, ventricles), geometric rules for the structures AAL
  lacks (brain stem, ventral DC, accumbens, 3rd/4th and inferior lateral ventricles), and
  extra-cerebral classes from a k-means clustering of the head around the brain.
* **jhu189** (``mricron-data``; 189 parcels, no name table): each parcel (pooled with its
  left/right homologue) becomes the output structure it overlaps most in the Colin27 map
  (both sit roughly in MNI space), with the purity of that overlap recorded; gyral parcels,
  which hold cortex and superficial white matter together, are split by depth.
* **ICBM 2009a** (``nilearn``: T1, GM and WM probability maps): tissue by maximum
  probability; deep structures, brain stem, cerebellum and ventricles from the Colin27 map
  resampled onto it (both are MNI-like): an approximation.

Every map is honest about what it is: the tables written by :func:`write_mapping_tables`
(committed under ``keyprep/data/synthseg_mapping/``) say which source label became which
generation and output label, with voxel counts and purities, and ``docs/synthseg_labels.md``
lists the heuristics, the per-label volume ratios to the SynthSeg maps, and the weaknesses.

Building Colin27 runs ANTs Atropos (about 30 s at 1 mm); built maps are cached under
``$KEYPREP_CACHE/anatomies`` (default ``$XDG_CACHE_HOME/keyprep/anatomies`` or
``~/.cache/keyprep/anatomies``) with a version key, never inside the package.

Coordinates: all three sources are roughly in MNI space; left is world x < 0 (RAS).

The package's modules: :mod:`.common` (files, cache, geometry and morphology helpers),
:mod:`.colin27`, :mod:`.jhu189`, :mod:`.icbm` (one builder each) and :mod:`.tables` (the
three together, mapping tables and volumes); everything public is importable from here.
"""

from __future__ import annotations

from ...targets import MRICRON_DIR
from .colin27 import (  # noqa: F401 (the builders' cached results, for tests and tools)
    ACCUMBENS_MNI,
    ACCUMBENS_RADIUS,
    ACCUMBENS_RULE,
    HEAD_CLUSTER_LABELS,
    _colin27,
    colin27_ground_truth,
    colin27_label_map,
    colin27_labels,
)
from .common import ANATOMY_VERSION, MAPPING_DIR, _image, cache_dir  # noqa: F401
from .icbm import _icbm2009a, icbm_label_map, icbm_labels  # noqa: F401
from .jhu189 import (  # noqa: F401
    JHU_PURITY_FLAG,
    JHU_SUPERFICIAL,
    _jhu189,
    jhu189_label_map,
    jhu189_labels,
)
from .tables import (  # noqa: F401
    _ANATOMIES,
    _TABLE_COLUMNS,
    extra_label_maps,
    label_volumes,
    main,
    mapping_table,
    read_volume_table,
    synthseg_mean_volumes,
    write_mapping_tables,
)

__all__ = [
    'ACCUMBENS_MNI',
    'ACCUMBENS_RADIUS',
    'ACCUMBENS_RULE',
    'ANATOMY_VERSION',
    'HEAD_CLUSTER_LABELS',
    'JHU_PURITY_FLAG',
    'JHU_SUPERFICIAL',
    'MAPPING_DIR',
    'MRICRON_DIR',
    'cache_dir',
    'colin27_ground_truth',
    'colin27_label_map',
    'colin27_labels',
    'extra_label_maps',
    'icbm_label_map',
    'icbm_labels',
    'jhu189_label_map',
    'jhu189_labels',
    'label_volumes',
    'main',
    'mapping_table',
    'read_volume_table',
    'synthseg_mean_volumes',
    'write_mapping_tables',
]
