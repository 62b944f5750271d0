"""`python -m pbs_cli` runs the same entry point as the `pbs` script."""

from .app import main

main()
