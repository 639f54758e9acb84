"""The ledger node: intake, proposer, validator, committer, its chain copy, the faust app."""
