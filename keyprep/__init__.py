"""keyprep: a BIDS App for brain MRI registration.

Skull stripping, anatomical labels, a panel of registration engines behind one
interface (ANTs baselines, KeyMorph, CARL and DIO; the learned engines' weights ship in
``keyprep/models`` with a model card each, undertrained for CARL and DIO),
ITK transforms in both directions, Dice/Jacobian QC tables and HTML reports.
"""

__version__ = '0.1.0'
__all__ = ['__version__']
