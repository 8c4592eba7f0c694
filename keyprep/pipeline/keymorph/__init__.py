"""KeyMorph: learned keypoints and closed-form registration (rigid, affine, thin-plate spline).

Modules: ``aligners`` (closed-form solvers, dense fields, ITK export); the detector network,
losses, training and refinement live in sibling modules. Nothing is imported here so that
``import keyprep.pipeline.keymorph`` stays cheap.
"""
