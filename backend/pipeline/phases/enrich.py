"""Phase 4, enrich: monthly payment, LTV, DTI including the new payment, and a grade."""

from __future__ import annotations

from backend.pipeline.phases.base import BasePhase, Batch, RunContext


def grade(credit_score: int, ltv: float, dti: float) -> str:
    """A-D risk grade: A needs strong credit, equity and headroom; D is everything else."""
    if credit_score >= 740 and ltv <= 0.80 and dti <= 0.36:
        return "A"
    if credit_score >= 700 and ltv <= 0.90 and dti <= 0.43:
        return "B"
    if credit_score >= 660:
        return "C"
    return "D"


class EnrichPhase(BasePhase):
    name = "enrich"

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        for row in batch.rows:
            monthly_rate = row.rate / 12.0
            n = row.term_months
            if monthly_rate == 0:
                payment = row.amount / n
            else:
                payment = row.amount * monthly_rate / (1.0 - (1.0 + monthly_rate) ** -n)
            row.monthly_payment = round(payment, 2)
            row.ltv = round(row.amount / row.property_value, 4)
            # DTI counts the borrower's existing debts plus this loan's payment.
            row.dti = round(
                (row.monthly_debt + row.monthly_payment) / (row.annual_income / 12.0), 4
            )
            row.grade = grade(row.credit_score, row.ltv, row.dti)
