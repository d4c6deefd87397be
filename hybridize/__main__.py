"""`python -m hybridize`: the same as the `hybridize` console script."""

import sys

from .cli import main

sys.exit(main())
