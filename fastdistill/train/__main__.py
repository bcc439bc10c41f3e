"""``python -m fastdistill.train`` / ``deepspeed --module fastdistill.train --config RUN.yaml``."""

import sys

from fastdistill.train.cli import main

sys.exit(main())
