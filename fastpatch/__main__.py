"""``python -m fastpatch`` is the ``fastpatch`` command."""

import sys

from fastpatch.cli import main

sys.exit(main())
