"""``python -m prorl_async.monitor.tui --replay METRICS.jsonl``: a recorded run in the TUI
(:mod:`prorl_async.monitor.tui.replay`)."""

import sys

from prorl_async.monitor.tui.replay import main

sys.exit(main())
