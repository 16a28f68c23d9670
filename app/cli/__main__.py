"""`python -m app.cli ...`: the same as `resmemnet ...`."""
import sys

from app.cli import main

sys.exit(main())
