"""``python -m streams`` is ``capledger`` (used to start node processes portably)."""

from streams.cli.main import main

main()
