"""Where an order post's time goes: N posts one after another (user B buys 1 unit at
1.00 KRW, each with its own Idempotency-Key), the medians and p99 of the phases the
API reports in Server-Timing (claim, write, projected) and of the whole request.
Token from $API_TOKEN (never on a command line). Usage: python post-timing.py URL [N]"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid

import httpx

BODY = {"security_code": "KR101502D327", "side": "buy", "price": "1.00", "quantity": 1}


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
    headers = {"Authorization": "Bearer " + os.environ["API_TOKEN"]}
    phases: dict[str, list[float]] = {"total": []}
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(count):
            started = time.perf_counter()
            answer = http.post("/api/market/orders", json=BODY,
                               headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
            phases["total"].append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200, answer.text
            for part in answer.headers.get("server-timing", "").split(","):
                name, _, duration = part.strip().partition(";dur=")
                if duration:
                    phases.setdefault(name, []).append(float(duration))
    for name, values in phases.items():
        values.sort()
        print(f"{name:10s} median {statistics.median(values):7.1f} ms   "
              f"p99 {values[int(len(values) * 0.99) - 1]:7.1f} ms   (n={len(values)})")


if __name__ == "__main__":
    main()
