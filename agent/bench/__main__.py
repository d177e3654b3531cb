"""``python -m agent.bench``: the benchmark is its own program (nothing imports agent.bench)."""
import sys

from agent.bench.bench import main

sys.exit(main(sys.argv[1:]))
