"""``python -m lowrank``: the experiment engine's command line (:mod:`lowrank.engine.cli`)."""

import sys

from lowrank.engine.cli import main

sys.exit(main())
