"""Entry point of ``python -m clip_search``."""

import sys

from clip_search.cli import main

sys.exit(main())
