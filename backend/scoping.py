"""Who may see what: the data-scoping rule shared by files and pipeline runs.

Loan tapes and everything derived from them (runs, facts, exceptions, reports)
belong to the sales team of the user who created them, or to that user alone
when they had no team. A non-admin reads:

- what belongs to their current team, and
- what they created themselves while not in a team (their personal scope).

Admins read everything, including data written before scoping existed (no
owner recorded). Anything a caller may not read is answered exactly like a
missing item (404), so its existence never leaks. Each domain applies this
rule in one place: `backend/files/service.py` for storage paths,
`backend/pipeline/service.py` (`readable_runs`) for runs and what hangs off them.

In storage the owner is the first segment of the key, `<area>/<scope>/...`,
with scope `team-<id>` or `user-<id>`: uploads land in the uploader's scope, a
run's reports in the run's, so a listing is a plain prefix listing and two
teams may upload files of the same name without seeing or overwriting each
other's.
"""

from __future__ import annotations

from backend.models import Role, User


def storage_scope(sales_team_id: int | None, user_id: int) -> str:
    """The storage scope segment of data created by `user_id` while in `sales_team_id`."""
    return f"team-{sales_team_id}" if sales_team_id is not None else f"user-{user_id}"


def creation_scope(user: User) -> str:
    """The scope of what `user` creates now."""
    return storage_scope(user.sales_team_id, user.id)


def is_unscoped_reader(user: User) -> bool:
    """Whether `user` reads everything (admins)."""
    return user.role == Role.ADMIN


def readable_scopes(user: User) -> tuple[str, ...]:
    """The storage scope segments a non-admin reads, in key order (team before user)."""
    own = storage_scope(None, user.id)
    if user.sales_team_id is None:
        return (own,)
    return (storage_scope(user.sales_team_id, user.id), own)
