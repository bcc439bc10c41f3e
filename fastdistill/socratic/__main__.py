"""``python -m fastdistill.socratic`` / ``deepspeed --module fastdistill.socratic build``."""

import sys

from fastdistill.socratic.cli import main

sys.exit(main())
