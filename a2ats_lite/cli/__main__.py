"""`python -m a2ats_lite.cli`: the same command line as the `a2ats-lite` script."""
from . import main

main()
