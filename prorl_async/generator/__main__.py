"""``python -m prorl_async.generator``: one generator process (:mod:`prorl_async.generator.service`)."""

import sys

from prorl_async.generator.service import main

sys.exit(main())
