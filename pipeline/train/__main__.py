"""`python -m pipeline.train`: see `pipeline.train.entry`."""

import sys

from pipeline.train.entry import main

sys.exit(main(sys.argv[1:]))
