"""``python -m fastdistill.weak_label`` / ``deepspeed --module fastdistill.weak_label``."""

import sys

from fastdistill.weak_label.cli import main

sys.exit(main())
