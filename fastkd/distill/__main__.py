"""`python -m fastkd.distill [flags]` is `fastkd distill [flags]`."""

import sys

from .cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
