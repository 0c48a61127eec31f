"""`python -m customedit_core edit|maps|info ...` (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
