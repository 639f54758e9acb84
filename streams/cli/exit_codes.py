"""The one table of ``capledger`` exit codes; every command exits with one of these.

| code | name      | meaning                                                              |
|------|-----------|----------------------------------------------------------------------|
| 0    | OK        | done (committed, projected, all nodes agree and report)              |
| 1    | ERROR     | cannot proceed: broker/database unreachable, broken state, a bug     |
| 2    | USAGE     | bad arguments or bad input (unreadable file, unparsable transaction) |
| 3    | REJECTED  | the ledger refused the input (rejection code printed)                |
| 4    | CONFLICT  | a safety alarm: nodes disagree, two certified blocks at one height,  |
|      |           | the replay differs from a node                                       |
| 5    | DEGRADED  | some nodes silent, missing or behind (the chain may still go on)     |
| 6    | TIMEOUT   | no outcome within the timeout (submitting again is safe)             |
| 130  | INTERRUPTED | stopped by Ctrl-C                                                  |

The README's "Exit codes" section is this table; ``tests/unit/test_cli_exit_codes.py``
checks that the two agree.
"""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
REJECTED = 3
CONFLICT = 4
DEGRADED = 5
TIMEOUT = 6
INTERRUPTED = 130
