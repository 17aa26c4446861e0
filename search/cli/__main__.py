"""``python -m search.cli``: the ``diffnas`` command."""

import sys

from search.cli import main

sys.exit(main())
