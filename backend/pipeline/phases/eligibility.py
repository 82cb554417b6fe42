"""Phase 5, eligibility: apply the rules of `backend.pipeline.eligibility` to each loan.

Every failed rule becomes a LoanException (severity `rule`, the rule's id and
message); a loan with no failures is eligible.
"""

from __future__ import annotations

from backend.models import Severity
from backend.pipeline.eligibility import Rule, build_rules
from backend.pipeline.phases.base import BasePhase, Batch, ExceptionRecord, RunContext


class EligibilityPhase(BasePhase):
    name = "eligibility"

    def __init__(self) -> None:
        self._rules: tuple[Rule, ...] = ()

    async def start(self, ctx: RunContext) -> None:
        self._rules = build_rules(ctx.settings)

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        rules = self._rules
        failures = ctx.rule_failures
        problems = batch.exceptions
        eligible = 0
        for row in batch.rows:
            failed = [rule for rule in rules if not rule.passes(row)]
            row.eligible = not failed
            if not failed:
                eligible += 1
                continue
            for rule in failed:
                failures[rule.id] += 1
                problems.append(
                    ExceptionRecord(
                        row.row_number, row.loan_id, Severity.RULE, rule.id, None, rule.explain(row)
                    )
                )
        ctx.counts.eligible += eligible
        ctx.counts.ineligible += len(batch.rows) - eligible
