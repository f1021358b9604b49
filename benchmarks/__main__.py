"""`python -m benchmarks SUITE [--quick | --tiny] [--out FILE.json]`: see benchmarks/cli.py."""
import sys

from benchmarks.cli import main

sys.exit(main())
