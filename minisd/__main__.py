"""`python -m minisd ...`: the command line (see minisd.cli)."""

from minisd.cli import main

if __name__ == "__main__":
    main()
