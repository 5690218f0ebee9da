"""``python -m bench``: the throughput and memory benchmark (see bench/throughput.py, --help)."""

import sys

from .throughput import main

sys.exit(main())
