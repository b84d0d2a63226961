"""`python -m qtool ARGS`: the same as the console script `qtool ARGS`, for an environment without the script
(a source checkout, or PYTHONPATH pointing at one)."""

from qtool.cli.entry import main

main()
