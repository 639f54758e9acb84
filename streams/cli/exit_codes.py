"""The one table of ``capledger`` exit codes; every command exits with one of these.

| code | name        | meaning                                                                   |
|------|-------------|---------------------------------------------------------------------------|
| 0    | OK          | done (committed, projected, all nodes agree and report)                   |
| 1    | ERROR       | cannot proceed: broker or database unreachable, broken state              |
| 2    | USAGE       | bad arguments or bad input                                                |
| 3    | REJECTED    | the ledger refused the input (the rejection code is printed)              |
| 4    | CONFLICT    | nodes disagree, two certified blocks at one height, or a replay differs   |
| 5    | DEGRADED    | degraded: some nodes silent, missing or behind                            |
| 6    | TIMEOUT     | no outcome within the timeout (submitting again is safe)                  |
| 70   | HALTED      | a node stopped itself: a safety check failed or it crashed (see its log)  |
| 130  | INTERRUPTED | interrupted (Ctrl-C)                                                      |

The README's "Exit codes" section is this table; ``tests/unit/test_cli_exit_codes.py``
checks that the two agree, that every constant below is in it, and that no module of
``streams/cli`` or ``streams/tools`` exits with a bare number. ``HALTED`` is used by the
node process itself (``streams/node/app.py`` ``EXIT_HALTED``, which may not import the
CLI); the test checks the two values are equal.
"""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
REJECTED = 3
CONFLICT = 4
DEGRADED = 5
TIMEOUT = 6
HALTED = 70
INTERRUPTED = 130
