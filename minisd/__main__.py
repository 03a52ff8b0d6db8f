"""`python -m minisd ...`: the command line (see minisd.cli)."""

import sys

from minisd.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
