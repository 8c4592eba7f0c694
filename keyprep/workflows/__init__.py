"""Nipype workflows (``init_*_wf`` builders) composing :mod:`keyprep.interfaces`."""
