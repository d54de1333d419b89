"""Entry point of ``python -m clip_search``."""

import sys

try:
    from clip_search.cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing started yet
    print('clip-search stopped before it was ready', flush=True)
    sys.exit(130)

sys.exit(main())
