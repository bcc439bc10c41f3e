"""``python -m fastdistill.cache build|info ...`` / ``deepspeed --module fastdistill.cache build --config RUN.yaml``."""

import sys

from fastdistill.cache.cli import main

sys.exit(main())
