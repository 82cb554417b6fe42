"""Sales teams: the admin API over HTTP, and the CLI commands as real processes on
the PostgreSQL test database."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx

from backend.tests.conftest import UserFactory
from backend.tests.test_cli import ROOT, cli


def cli_with_password(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`cli` with `--password-stdin` and a password on stdin (for create-user)."""
    return subprocess.run(
        [sys.executable, "-m", "backend.admin.cli", *args, "--password-stdin"],
        cwd=ROOT,
        env=env,
        input="a-password-long-enough\n",
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_admin_creates_renames_and_lists_teams(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: UserFactory
) -> None:
    created = await client.post(
        "/api/teams", json={"name": "  West  ", "region": "Pacific"}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    team = created.json()
    assert (team["name"], team["region"], team["member_count"]) == ("West", "Pacific", 0)
    taken = await client.post("/api/teams", json={"name": "West"}, headers=admin_headers)
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "team_name_taken")
    other = (await client.post("/api/teams", json={"name": "East"}, headers=admin_headers)).json()

    renamed = await client.patch(
        f"/api/teams/{team['id']}", json={"name": "West Coast"}, headers=admin_headers
    )
    assert renamed.json()["name"] == "West Coast"
    clash = await client.patch(
        f"/api/teams/{team['id']}", json={"name": "East"}, headers=admin_headers
    )
    assert clash.status_code == 409
    null_name = await client.patch(
        f"/api/teams/{team['id']}", json={"name": None}, headers=admin_headers
    )
    assert null_name.status_code == 422
    assert (await client.get("/api/teams/999", headers=admin_headers)).status_code == 404
    assert (
        await client.patch("/api/teams/999", json={"name": "x"}, headers=admin_headers)
    ).status_code == 404

    member = await make_user("viewer", sales_team_id=team["id"])
    listing = await client.get("/api/teams", headers=admin_headers)
    body = listing.json()
    assert body["total"] == 2
    assert [(t["name"], t["member_count"]) for t in body["items"]] == [
        ("West Coast", 1),
        ("East", 0),
    ]
    # Out of the team again, through the users endpoint.
    out = await client.patch(
        f"/api/users/{member['id']}", json={"sales_team_id": None}, headers=admin_headers
    )
    assert out.json()["sales_team_id"] is None
    unknown = await client.patch(
        f"/api/users/{member['id']}", json={"sales_team_id": 999}, headers=admin_headers
    )
    assert unknown.status_code == 400
    assert (await client.get(f"/api/teams/{other['id']}", headers=admin_headers)).is_success


async def test_teams_are_admin_only(client: httpx.AsyncClient, make_user: UserFactory) -> None:
    analyst = (await make_user("analyst"))["headers"]
    assert (await client.get("/api/teams", headers=analyst)).status_code == 403
    assert (await client.post("/api/teams", json={"name": "x"}, headers=analyst)).status_code == 403
    assert (await client.get("/api/teams")).status_code == 401


def test_team_commands(clean_db: str) -> None:
    env = {**os.environ, "ENVIRONMENT": "test", "DATABASE_URL": clean_db, "BCRYPT_ROUNDS": "4"}
    for name in ("alice", "bob"):
        made = cli_with_password(env, "create-user", name, f"{name}@example.com")
        assert made.returncode == 0, made.stderr

    created = cli("create-team", "North", "--region", "Atlantic", env=env)
    assert created.returncode == 0, created.stderr
    assert "created team id=1 name=North" in created.stderr
    again = cli("create-team", "North", env=env)
    assert again.returncode == 1
    assert "error: A sales team with this name already exists" in again.stderr
    assert cli("create-team", "", env=env).returncode == 2
    assert cli("create-team", "South", env=env).returncode == 0

    renamed = cli("rename-team", "North", "North East", env=env)
    assert renamed.returncode == 0, renamed.stderr
    assert cli("rename-team", "2", "North East", env=env).returncode == 1  # taken
    missing = cli("rename-team", "Nowhere", "X", env=env)
    assert missing.returncode == 1
    assert "error: Sales team not found" in missing.stderr

    assert cli("assign-team", "alice", "North East", env=env).returncode == 0
    assert cli("assign-team", "bob", "2", env=env).returncode == 0
    listed = cli("list-teams", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    teams = [
        (t["id"], t["name"], t["region"], t["member_count"]) for t in json.loads(listed.stdout)
    ]
    assert teams == [(1, "North East", "Atlantic", 1), (2, "South", None, 1)]
    table = cli("list-teams", env=env)
    assert "North East" in table.stdout and "Total: 2 teams" in table.stdout

    out = cli("assign-team", "alice", "--none", env=env)
    assert out.returncode == 0, out.stderr
    assert "user alice is now in no team" in out.stderr
    users = json.loads(cli("list-users", "--json", env=env).stdout)
    assert {u["username"]: u["sales_team_id"] for u in users} == {"alice": None, "bob": 2}

    assert cli("assign-team", "alice", env=env).returncode == 2  # neither TEAM nor --none
    assert cli("assign-team", "alice", "South", "--none", env=env).returncode == 2
    assert cli("assign-team", "nobody", "South", env=env).returncode == 1
    assert cli("assign-team", "alice", "Nowhere", env=env).returncode == 1
