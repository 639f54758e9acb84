"""Running the API server: uvicorn around :func:`streams.api.app.create_app`.

Owns: :func:`serve` (one process, one event loop, stops on SIGINT/SIGTERM) and the
standard principals :func:`default_identities` of a fresh access file (the seed's
users A and B, their brokers' systems, koscom's back office and the regulator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from streams.api.app import create_app
from streams.api.auth import NewIdentity
from streams.api.context import ApiDeps

HOST_DEFAULT = "127.0.0.1"
PORT_DEFAULT = 8480
USER_A_ACCOUNT = "user-a"
USER_B_ACCOUNT = "user-b"


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = HOST_DEFAULT
    port: int = PORT_DEFAULT
    log_level: str = "warning"


def default_identities() -> list[NewIdentity]:
    return [
        NewIdentity("koscom-backoffice", "client", "platform", "koscom"),
        NewIdentity("securities-a", "client", "firm", "securities-a"),
        NewIdentity("securities-b", "client", "firm", "securities-b"),
        NewIdentity("surveillance", "client", "regulator", "surveillance"),
        NewIdentity("user-a", "user", "user", "securities-a", (USER_A_ACCOUNT,), "홍길동"),
        NewIdentity("user-b", "user", "user", "securities-b", (USER_B_ACCOUNT,), "박서방"),
        NewIdentity("regulator", "user", "regulator", "surveillance", (), "시장감시"),
    ]


def serve(deps: ApiDeps, options: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both and drains requests)."""
    config = uvicorn.Config(create_app(deps), host=options.host, port=options.port,
                            log_level=options.log_level, access_log=False,
                            lifespan="on", proxy_headers=False, server_header=False)
    uvicorn.Server(config).run()


def access_dir_of(state_dir: Path) -> Path:
    return state_dir / "api"


def init_state(directory: Path, *, token_ttl_s: int, custody_password: str | None = None) -> Path:
    """A fresh API state directory: the access file, the token key, the custody stores
    with the seed's users A and B; every generated secret in initial-credentials.json
    (mode 0600), the file returned."""
    import json

    from streams.api.auth import write_access
    from streams.api.custody import open_seed_accounts

    credentials = write_access(directory, default_identities(), token_ttl_s=token_ttl_s)
    made = json.loads(credentials.read_text(encoding="utf-8"))
    made["custodial_users"] = open_seed_accounts(directory, password=custody_password)
    credentials.write_text(json.dumps(made, indent=2) + "\n", encoding="utf-8")
    return credentials


def load_custody(directory: Path) -> Any:
    """The custody stores of the API state directory, None when it has none."""
    from streams.api.custody import CUSTODY_DIR, load_accounts

    if not (directory / CUSTODY_DIR).is_dir():
        return None
    return load_accounts(directory)


def build_market(keys_dir: Path, deps: ApiDeps) -> Callable[[], Any]:
    """A factory of the market service this process runs in the local one-process
    deployment: the otc-operator's board and messenger, securities-a and -b's issuance,
    over the same custody stores the API signs users in with (their sessions are the same
    objects). Keys are loaded now, so a missing key fails before serving."""
    from streams.common.genesis_files import load_institution_key
    from streams.market.service import MarketService

    def key(institution: str) -> Any:
        return load_institution_key(keys_dir, institution, genesis=deps.genesis)

    operator = key("otc-operator")
    issuers = {firm: key(firm) for firm in ("securities-a", "securities-b")}
    return lambda: MarketService(deps.bootstrap, deps.genesis, accounts=deps.accounts,
                                 operator_key=operator, issuer_keys=issuers,
                                 topic_prefix=deps.topic_prefix)
