"""`python -m vastd` is the `vastd` command."""

import sys

from vastd.cli import main

sys.exit(main())
