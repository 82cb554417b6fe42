"""The seven phases, in the order the engine runs them."""

from __future__ import annotations

from backend.pipeline.phases.base import Phase
from backend.pipeline.phases.eligibility import EligibilityPhase
from backend.pipeline.phases.enrich import EnrichPhase
from backend.pipeline.phases.ingest import IngestPhase
from backend.pipeline.phases.normalize import NormalizePhase
from backend.pipeline.phases.persist import PersistPhase
from backend.pipeline.phases.report import ReportPhase
from backend.pipeline.phases.validate import ValidatePhase

PHASE_NAMES = ("ingest", "validate", "normalize", "enrich", "eligibility", "persist", "report")


def default_phases() -> list[Phase]:
    """Fresh phase objects for one run (phases keep per-run state)."""
    return [
        IngestPhase(),
        ValidatePhase(),
        NormalizePhase(),
        EnrichPhase(),
        EligibilityPhase(),
        PersistPhase(),
        ReportPhase(),
    ]
