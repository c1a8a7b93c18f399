"""``python -m hf_fisher.cli [COMMAND] [options]`` is ``hf-fisher [COMMAND] [options]``."""

import sys

from hf_fisher.cli import main

if __name__ == "__main__":
    sys.exit(main())
