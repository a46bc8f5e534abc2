"""``python -m isopace``: the command line."""

import sys

from isopace.cli import main

sys.exit(main())
