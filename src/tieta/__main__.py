"""``python -m tieta``: the same as the ``tieta`` command."""

import sys

from tieta.cli import main

sys.exit(main())
