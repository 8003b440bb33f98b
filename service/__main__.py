"""Entry point for `python -m service`."""
import sys

from .cli.operator import main

sys.exit(main())
