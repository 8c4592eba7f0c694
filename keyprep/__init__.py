"""keyprep: a BIDS App for brain MRI registration.

Skull stripping, anatomical labels, a panel of registration engines behind one
interface (ANTs baselines, KeyMorph; CARL and DIO engines built, their weights not shipped
yet: give --carl-weights / --dio-weights),
ITK transforms in both directions, Dice/Jacobian QC tables and HTML reports.
"""

__version__ = '0.1.0'
__all__ = ['__version__']
