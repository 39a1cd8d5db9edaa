"""``python -m vitpcm`` is the same as the ``vitpcm`` command."""

import sys

from vitpcm.cli import main

sys.exit(main())
