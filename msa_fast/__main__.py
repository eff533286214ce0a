"""``python -m msa_fast ...`` is ``msa-fast ...``."""

import sys

from msa_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
