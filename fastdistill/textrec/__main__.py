import sys

from fastdistill.textrec.cli import main

sys.exit(main())
