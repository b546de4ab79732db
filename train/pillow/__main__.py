"""`python -m train.pillow ...`: train a PILLOW matcher, or --evaluate one (see train.pillow.cli)."""

import sys

from train.pillow.cli import main

sys.exit(main())
