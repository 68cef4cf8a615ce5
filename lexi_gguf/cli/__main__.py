"""`python -m lexi_gguf.cli`: the same as the `lexi-gguf` command."""
import sys

from . import main

sys.exit(main())
