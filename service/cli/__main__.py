"""`python -m service.cli`: the `microtasks` client command line."""
import sys

from .main import main

sys.exit(main())
