"""Derivative file names, for the BIDS-App layer.

The names are defined in :mod:`keyprep.pipeline.naming` (below the interfaces and workflows
that also build them; see ``tests/test_layering.py``); this module is where the command
line, reports and QC recovery take them from.
"""

from __future__ import annotations

from ..pipeline.naming import (  # noqa: F401
    CONTRASTS,
    PATTERNS,
    REFERENCE_CONTRAST,
    bids_uri,
    derivative_name,
    qc_table_name,
    source_entities,
    target_figure_name,
    target_stem,
)

__all__ = ['PATTERNS', 'bids_uri', 'derivative_name', 'qc_table_name', 'source_entities',
           'target_figure_name', 'target_stem']
