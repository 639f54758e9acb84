"""The seed's assets: its three bonds with plausible terms, and KRW deposits.

Owns: ``SEED_BONDS`` and ``SEED_DEPOSITS`` (``AssetDefinition`` records) used by the
integration tests, ``capledger market register --seed`` and the market benchmark.
국민주택 2013-02 and 국고02750-1709(12-4) are brought online by securities-a,
통안0146-1804-02 by securities-b; each firm issues its own KRW deposit (1 unit = 1 won).
Codes, coupons and issue dates are illustrative, not taken from a real register.
"""

from __future__ import annotations

from ledger.assets import AssetDefinition

KUKMIN = "KR101502D327"  # 국민주택 2013-02
TONGAN = "KR1350146D48"  # 통안0146-1804-02
KUKGO = "KR103502G797"  # 국고02750-1709(12-4)
BOND_FACE_VALUE_KRW = 10_000  # prices are quoted per 10,000 won of face value

SEED_BONDS: tuple[AssetDefinition, ...] = (
    AssetDefinition(KUKMIN, "국민주택 2013-02", "bond", "securities-a", "KRW",
                    maturity="2018-02-28", coupon_bp=275, issue_date="2013-02-28",
                    face_value=BOND_FACE_VALUE_KRW),
    AssetDefinition(TONGAN, "통안0146-1804-02", "bond", "securities-b", "KRW",
                    maturity="2018-04-02", coupon_bp=146, issue_date="2016-04-02",
                    face_value=BOND_FACE_VALUE_KRW),
    AssetDefinition(KUKGO, "국고02750-1709(12-4)", "bond", "securities-a", "KRW",
                    maturity="2017-09-10", coupon_bp=275, issue_date="2012-09-10",
                    face_value=BOND_FACE_VALUE_KRW),
)
KRW_A = AssetDefinition("KRW-DEP-A", "원화예수금 (A증권)", "deposit", "securities-a", "KRW",
                        face_value=1)
KRW_B = AssetDefinition("KRW-DEP-B", "원화예수금 (B증권)", "deposit", "securities-b", "KRW",
                        face_value=1)
SEED_DEPOSITS: tuple[AssetDefinition, ...] = (KRW_A, KRW_B)
SEED_ASSETS: tuple[AssetDefinition, ...] = SEED_BONDS + SEED_DEPOSITS
