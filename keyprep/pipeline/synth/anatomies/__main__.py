"""``python -m keyprep.pipeline.synth.anatomies``: build (or load) the anatomies, write the
mapping and volume tables."""

from .tables import main

if __name__ == '__main__':
    raise SystemExit(main())
