"""``python -m rlkit …`` runs the ``rlkit`` command (rlkit.cli)."""

import sys

from rlkit.cli import main

sys.exit(main())
