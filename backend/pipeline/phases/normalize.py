"""Phase 3, normalize: one canonical form for every value that passed validation.

Text is trimmed; state, property type and occupancy are upper-cased and common
spellings mapped to one code; the rate goes from annual percent to a fraction;
money is rounded to cents; the origination date is parsed.
"""

from __future__ import annotations

from backend.pipeline.phases.base import BasePhase, Batch, RunContext
from backend.pipeline.phases.validate import parse_date

PROPERTY_TYPES = {
    "SINGLE FAMILY": "SFR",
    "SINGLE-FAMILY": "SFR",
    "SF": "SFR",
    "CONDOMINIUM": "CONDO",
    "TOWNHOME": "TOWNHOUSE",
    "2-4 UNITS": "2-4 UNIT",
    "MULTI-FAMILY": "2-4 UNIT",
    "MULTIFAMILY": "2-4 UNIT",
}
OCCUPANCY = {
    "OWNER OCCUPIED": "PRIMARY",
    "OWNER-OCCUPIED": "PRIMARY",
    "PRIMARY RESIDENCE": "PRIMARY",
    "SECOND": "SECOND HOME",
    "INVESTOR": "INVESTMENT",
}


def _code(text: str, synonyms: dict[str, str]) -> str:
    value = " ".join(text.split()).upper()
    return synonyms.get(value, value)


class NormalizePhase(BasePhase):
    name = "normalize"

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        for row in batch.rows:
            row.loan_id = row.loan_id.strip()
            row.borrower_id = row.borrower_id.strip()
            row.state = row.state.strip().upper()
            row.property_type = _code(row.property_type, PROPERTY_TYPES)
            row.occupancy = _code(row.occupancy, OCCUPANCY)
            team = (row.sales_team or "").strip()
            row.sales_team = team or None
            row.rate = round(row.rate / 100.0, 6)
            row.amount = round(row.amount, 2)
            row.annual_income = round(row.annual_income, 2)
            row.monthly_debt = round(row.monthly_debt, 2)
            row.property_value = round(row.property_value, 2)
            if isinstance(row.origination_date, str):
                row.origination_date = parse_date(row.origination_date)
