"""``python -m prorl_async.learner RUN_DIR [--resume CHECKPOINT_DIR]``: the learner process
(:mod:`prorl_async.learner.service`)."""

import sys

from prorl_async.learner.service import main

sys.exit(main())
