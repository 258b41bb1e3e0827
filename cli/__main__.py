"""``python -m cli ...`` is ``lsa ...``."""
import sys

from cli import main

sys.exit(main())
