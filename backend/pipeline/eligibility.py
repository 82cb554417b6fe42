"""Eligibility rules: each has a stable id, a threshold from settings, and a message.

Rules read the enriched, normalized `LoanRow` (rounded LTV and DTI, the values
users see), and a loan is eligible when it fails none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backend.config import Settings
from backend.pipeline.phases.base import LoanRow


@dataclass(frozen=True, slots=True)
class Rule:
    """`passes(row)` is true when the loan meets the rule; `explain(row)` says why not."""

    id: str
    description: str
    passes: Callable[[LoanRow], bool]
    explain: Callable[[LoanRow], str]


def build_rules(settings: Settings) -> tuple[Rule, ...]:
    """The rule set under `settings`' ELIGIBILITY_* thresholds, in evaluation order."""
    min_score = settings.ELIGIBILITY_MIN_CREDIT_SCORE
    max_dti = settings.ELIGIBILITY_MAX_DTI
    max_ltv = settings.ELIGIBILITY_MAX_LTV
    max_amount = settings.ELIGIBILITY_MAX_AMOUNT
    terms = frozenset(settings.ELIGIBILITY_ALLOWED_TERMS)
    property_types = frozenset(settings.ELIGIBILITY_ALLOWED_PROPERTY_TYPES)
    states = frozenset(settings.ELIGIBILITY_ALLOWED_STATES)
    return (
        Rule(
            "min_credit_score",
            f"credit score at least {min_score}",
            lambda r: r.credit_score >= min_score,
            lambda r: f"credit score {r.credit_score} is below the minimum {min_score}",
        ),
        Rule(
            "max_dti",
            f"debt-to-income at most {max_dti:g}",
            lambda r: r.dti <= max_dti,
            lambda r: f"DTI {r.dti:.4f} is above the maximum {max_dti:g}",
        ),
        Rule(
            "max_ltv",
            f"loan-to-value at most {max_ltv:g}",
            lambda r: r.ltv <= max_ltv,
            lambda r: f"LTV {r.ltv:.4f} is above the maximum {max_ltv:g}",
        ),
        Rule(
            "max_amount",
            f"amount at most {max_amount:,.0f}",
            lambda r: r.amount <= max_amount,
            lambda r: f"amount {r.amount:,.2f} is above the maximum {max_amount:,.2f}",
        ),
        Rule(
            "allowed_term",
            f"term one of {sorted(terms)} months",
            lambda r: r.term_months in terms,
            lambda r: f"term {r.term_months} months is not one of {sorted(terms)}",
        ),
        Rule(
            "allowed_property_type",
            "property type in the allowed list",
            lambda r: r.property_type in property_types,
            lambda r: f"property type {r.property_type} is not allowed",
        ),
        Rule(
            "allowed_state",
            "state in the allowed list",
            lambda r: r.state in states,
            lambda r: f"state {r.state} is not allowed",
        ),
    )


def failed_rules(rules: tuple[Rule, ...], row: LoanRow) -> list[Rule]:
    """The rules `row` fails, in rule order (empty when eligible)."""
    return [rule for rule in rules if not rule.passes(row)]
