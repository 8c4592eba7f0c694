"""keyprep: a BIDS App for brain MRI registration."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'keyprep' / '__init__.py').read_text()).group(1)

setup(
    name='keyprep',
    version=VERSION,
    description='BIDS App for brain MRI registration: skull stripping, labels, KeyMorph/CARL/DIO/ANTs '
    'engines, ITK transforms, Dice/Jacobian QC and HTML reports',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['keyprep', 'keyprep.*']),
    include_package_data=True,
    # the label network's weights and model card live outside any Python package folder
    package_data={'keyprep': ['data/*', 'data/**/*', 'models/synthseg/*.pt',
                              'models/synthseg/*.md', 'models/synthseg/*.json',
                              'models/keymorph/*.pt', 'models/keymorph/*.md',
                              'models/keymorph/*.json', 'models/carl/*.pt',
                              'models/carl/*.md', 'models/carl/*.json', 'models/dio/*.pt',
                              'models/dio/*.md', 'models/dio/*.json']},
    install_requires=[
        'nipype>=1.10',
        'pybids>=0.16',
        'nibabel>=5.0',
        'antspyx>=0.5',
        # CPU wheel on the project's machines; any CUDA build works on GPU hosts.
        'torch>=2.1',
        'pandas>=2.0',
        'numpy>=1.24',
        'scipy>=1.10',
        'deepbet>=1.0.2',
        'nilearn>=0.10',  # only for the packaged ICBM 2009a template files
        'nitransforms>=24.0',
        'matplotlib>=3.7',
        'jinja2>=3.0',
        'markupsafe>=2.0',  # the report's HTML escaping
        'pillow>=9.0',  # report figures (PIL)
        'pyyaml>=5.1',  # --use-plugin files
        # the official (schema-based) BIDS validator, offline, Deno runtime included: the
        # input dataset is validated with it (--skip-bids-validation to skip)
        'bids-validator-deno',
    ],
    extras_require={
        # pytest-xdist: the suite runs on every core (scripts/test.sh), one file per worker
        'test': ['pytest>=7', 'pytest-xdist>=3.5'],
    },
    entry_points={
        'console_scripts': [
            'keyprep=keyprep.bids_app.run:main',
            'keyprep-demo=keyprep.bids_app.demo:main',
            'keyprep-slurm=keyprep.bids_app.slurm:main',
            'keyprep-train=keyprep.bids_app.train:main',
        ],
    },
)
