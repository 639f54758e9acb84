"""The ``capledger`` command line: one module per command group; each parses, calls, prints."""
