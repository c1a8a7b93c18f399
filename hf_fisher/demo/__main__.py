"""``python -m hf_fisher.demo [options]`` is ``hf-fisher demo [options]``.

The entry point lives here, not in :mod:`hf_fisher.demo`, so that the demo never imports the
command line (which imports the demo's options): no import circle.
"""

import sys

from hf_fisher.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
