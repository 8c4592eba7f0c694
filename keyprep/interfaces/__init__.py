"""Thin Nipype interfaces over :mod:`keyprep.pipeline` (heavy imports inside ``_run_interface``)."""
