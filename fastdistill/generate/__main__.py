"""``python -m fastdistill.generate`` / ``deepspeed --module fastdistill.generate``."""

import sys

from fastdistill.generate.cli import main

sys.exit(main())
