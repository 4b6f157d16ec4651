"""`python -m tune_xray.report EXPERIMENT_DIR`."""

import sys

from . import main

sys.exit(main())
