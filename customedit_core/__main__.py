"""`python -m customedit_core <command> ...`: edit, maps, diffedit, specref, train-concept, dci,
import-concept, info (see cli.py, or `python -m customedit_core <command> --help`)."""
import sys

from .cli import main

sys.exit(main())
