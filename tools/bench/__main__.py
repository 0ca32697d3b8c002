"""`python -m tools.bench` (what `make bench` runs): the performance figures, tools/bench/performance.py."""

import sys

from tools.bench.performance import main

sys.exit(main())
