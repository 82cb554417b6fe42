"""The loan tape format, and a generator of realistic sample tapes.

A tape is a UTF-8 CSV file (optionally gzipped, `.csv.gz`) with a header row
naming at least the columns in `REQUIRED_COLUMNS`, in any order (names are
matched case-insensitively; extra columns are ignored). See the README section
"Loan tapes" for each column's type and accepted range.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

# Every column a tape must have, as `backend.pipeline.columns` defines them.
from backend.pipeline.columns import REQUIRED_COLUMNS as REQUIRED_COLUMNS

# Weights loosely follow where US mortgages are written.
_STATES = (
    ("CA", 14), ("TX", 9), ("FL", 8), ("NY", 6), ("IL", 4), ("PA", 4), ("OH", 4), ("GA", 4),
    ("NC", 4), ("MI", 3), ("NJ", 3), ("VA", 3), ("WA", 3), ("AZ", 3), ("MA", 3), ("CO", 3),
    ("TN", 2), ("IN", 2), ("MO", 2), ("MD", 2), ("WI", 2), ("MN", 2), ("OR", 2), ("UT", 2),
    ("NV", 2), ("SC", 2), ("AL", 1), ("KY", 1), ("LA", 1), ("OK", 1), ("CT", 1), ("IA", 1),
)  # fmt: skip
_PROPERTY_TYPES = (("SFR", 60), ("CONDO", 15), ("PUD", 12), ("TOWNHOUSE", 10), ("2-4 UNIT", 3))
_OCCUPANCY = (("PRIMARY", 85), ("INVESTMENT", 10), ("SECOND HOME", 5))
_TERMS = ((360, 70), (180, 15), (240, 8), (120, 7))
_TEAMS = ("Pacific", "Mountain", "Central", "Atlantic", "Gulf", "")
_BASE_DATE = date(2025, 6, 30)
_BREAKS = ("credit", "dti", "ltv", "amount", "term", "property_type", "state")
_MALFORMED = ("amount", "credit_score", "date", "field_count", "rate", "term")


def monthly_payment(amount: float, annual_rate: float, term_months: int) -> float:
    """Level payment of a fully amortizing loan; `annual_rate` as a fraction (0.065)."""
    r = annual_rate / 12.0
    if r == 0:
        return amount / term_months
    return amount * r / (1.0 - (1.0 + r) ** -term_months)


def _pick(rng: random.Random, table: tuple[tuple[object, int], ...]) -> object:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def generate_tape(
    rows: int,
    *,
    seed: int = 1,
    ineligible_share: float = 0.15,
    malformed_share: float = 0.02,
) -> Iterator[list[str]]:
    """Header then `rows` data rows. The same arguments always give the same rows.

    About `ineligible_share` of rows break exactly one eligibility rule under the
    default thresholds and about `malformed_share` carry one unreadable value;
    the rest are eligible under the defaults.
    """
    rng = random.Random(seed)  # noqa: S311 (sample data, reproducible by design)
    yield list(REQUIRED_COLUMNS)
    for i in range(1, rows + 1):
        roll = rng.random()
        malformed = roll < malformed_share
        breaks = (
            None if malformed or roll >= malformed_share + ineligible_share else rng.choice(_BREAKS)
        )
        amount = min(max(rng.lognormvariate(math.log(300_000), 0.45), 60_000), 760_000)
        amount = round(amount / 100) * 100
        rate = round(rng.uniform(5.0, 8.0), 3)
        term = int(_pick(rng, _TERMS))  # type: ignore[call-overload]
        score = rng.randint(640, 820)
        ltv = rng.uniform(0.50, 0.95)
        dti = rng.uniform(0.15, 0.40)
        state = str(_pick(rng, _STATES))
        ptype = str(_pick(rng, _PROPERTY_TYPES))
        if breaks == "credit":
            score = rng.randint(500, 619)
        elif breaks == "amount":
            amount = round(rng.uniform(770_000, 1_500_000), -2)
        elif breaks == "ltv":
            ltv = rng.uniform(0.99, 1.10)
        elif breaks == "dti":
            dti = rng.uniform(0.46, 0.60)
        elif breaks == "term":
            term = rng.choice((60, 300, 480))
        elif breaks == "property_type":
            ptype = rng.choice(("MANUFACTURED", "CO-OP", "LAND"))
        elif breaks == "state":
            state = rng.choice(("PR", "GU", "VI"))
        payment = monthly_payment(amount, rate / 100, term)
        debt = round(rng.uniform(0, 1500), 2)
        # Income rounded up to $100 keeps the realized DTI at or under the target.
        income = math.ceil((payment + debt) / dti * 12 / 100) * 100
        value = round(amount / ltv / 100) * 100
        origination = _BASE_DATE - timedelta(days=rng.randint(0, 3 * 365))
        values = {
            "loan_id": f"L{seed % 1000:03d}{i:09d}",
            "borrower_id": f"B{rng.randint(0, 99_999_999):08d}",
            "amount": f"{amount:.2f}",
            "rate": f"{rate:.3f}",
            "term_months": str(term),
            "credit_score": str(score),
            "annual_income": f"{income:.2f}",
            "monthly_debt": f"{debt:.2f}",
            "property_value": f"{value:.2f}",
            "state": state if rng.random() > 0.05 else state.lower(),  # some lower-case states
            "property_type": ptype,
            "occupancy": str(_pick(rng, _OCCUPANCY)),
            "origination_date": origination.isoformat(),
            "sales_team": rng.choice(_TEAMS),
        }  # the calls to rng above run in this order: keep it, or every tape changes
        kind = rng.choice(_MALFORMED) if malformed else None
        if kind == "amount":
            values["amount"] = "12O,000"
        elif kind == "credit_score":
            values["credit_score"] = "9999"
        elif kind == "date":
            values["origination_date"] = "2024-02-30"
        elif kind == "rate":
            values["rate"] = ""
        elif kind == "term":
            values["term_months"] = "thirty"
        row = [values[name] for name in REQUIRED_COLUMNS]
        if kind == "field_count":
            row = row[:-3]  # a short row: its last three fields are missing
        yield row


def write_tape(path: Path, rows: int, **options: float | int) -> None:
    """Write `generate_tape(rows, **options)` to `path` as CSV, streaming."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerows(generate_tape(rows, **options))  # type: ignore[arg-type]
