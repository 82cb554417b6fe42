"""Data scoping over HTTP: two sales teams, each with an analyst and a viewer, a user
without a team, and an admin. Every read of tapes and runs answers 404 for what the
caller may not read (the very answer of a missing item) and lists leave it out."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from backend.database import Database
from backend.models import PipelineRun, RunStatus
from backend.tests.conftest import UserFactory, make_team
from backend.tests.pipeline_support import KNOWN_TAPE, upload_tape

Headers = dict[str, str]


@dataclass
class Side:
    """One team's (or the loner's) people and what they created."""

    analyst: Headers
    viewer: Headers
    tape: str
    run_id: str
    output_prefix: str


@dataclass
class World:
    admin: Headers
    a: Side
    b: Side
    loner: Side  # an analyst with no team; `viewer` is the same person


async def _side(
    client: httpx.AsyncClient, make_user: UserFactory, team: int | None, app: FastAPI
) -> Side:
    fields: dict[str, Any] = {} if team is None else {"sales_team_id": team}
    analyst = (await make_user("analyst", **fields))["headers"]
    viewer = (await make_user("viewer", **fields))["headers"] if team is not None else analyst
    # Same file name in every scope: each team has its own, none sees the others'.
    tape = await upload_tape(client, analyst, "tape.csv", KNOWN_TAPE)
    started = await client.post("/api/pipeline/run", json={"input_path": tape}, headers=analyst)
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    await app.state.runner.join()
    run = await client.get(f"/api/pipeline/runs/{run_id}", headers=analyst)
    assert run.json()["status"] == "completed", run.text
    return Side(analyst, viewer, tape, run_id, run.json()["output_prefix"])


@pytest.fixture
async def world(
    client: httpx.AsyncClient, admin_headers: Headers, make_user: UserFactory, app: FastAPI
) -> World:
    team_a = await make_team(client, admin_headers, "Team A")
    team_b = await make_team(client, admin_headers, "Team B")
    return World(
        admin=admin_headers,
        a=await _side(client, make_user, team_a, app),
        b=await _side(client, make_user, team_b, app),
        loner=await _side(client, make_user, None, app),
    )


def _paths(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["path"] for item in response.json()["items"]]


def _error(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


async def test_file_listings_hold_only_the_callers_scope(
    client: httpx.AsyncClient, world: World
) -> None:
    for side in (world.a, world.b, world.loner):
        for who in (side.analyst, side.viewer):
            inputs = await client.get("/api/files", headers=who)
            assert _paths(inputs) == [side.tape]
            assert inputs.json()["total"] == 1
            outputs = await client.get("/api/files", params={"area": "outputs"}, headers=who)
            assert all(p.startswith(side.output_prefix) for p in _paths(outputs))
            assert outputs.json()["total"] == 3
            # Asking for another scope by prefix finds nothing.
            others = [s for s in (world.a, world.b, world.loner) if s is not side]
            for other in others:
                key = other.tape.removeprefix("inputs/")
                probe = await client.get("/api/files", params={"prefix": key}, headers=who)
                assert (_paths(probe), probe.json()["total"]) == ([], 0)
    everything = await client.get("/api/files", headers=world.admin)
    assert sorted(_paths(everything)) == sorted([world.a.tape, world.b.tape, world.loner.tape])
    outputs = await client.get("/api/files", params={"area": "outputs"}, headers=world.admin)
    assert outputs.json()["total"] == 9


async def test_file_listing_pages_across_team_and_personal_scopes(
    client: httpx.AsyncClient, admin_headers: Headers, make_user: UserFactory
) -> None:
    """A user who uploaded while in no team, then joined one, reads both: the page and
    total run over the two scopes as over one listing."""
    user = await make_user("analyst")
    personal = [await upload_tape(client, user["headers"], f"p{i}.csv", KNOWN_TAPE) for i in (1, 2)]
    team = await make_team(client, admin_headers, "Joined")
    moved = await client.patch(
        f"/api/users/{user['id']}", json={"sales_team_id": team}, headers=admin_headers
    )
    assert moved.status_code == 200
    shared = [await upload_tape(client, user["headers"], f"t{i}.csv", KNOWN_TAPE) for i in (1, 2)]
    assert all(p.startswith(f"inputs/team-{team}/") for p in shared)
    expected = shared + personal  # team-... sorts before user-...
    pages = []
    for offset in range(0, 4, 3):
        page = await client.get(
            "/api/files", params={"limit": 3, "offset": offset}, headers=user["headers"]
        )
        assert page.json()["total"] == 4
        pages += _paths(page)
    assert pages == expected


async def test_downloads_of_other_scopes_are_404_like_missing_files(
    client: httpx.AsyncClient, world: World
) -> None:
    missing = await client.get(
        "/api/files/download",
        params={"path": world.a.tape.replace("tape.csv", "absent.csv")},
        headers=world.a.viewer,
    )
    assert missing.status_code == 404
    sides = (world.a, world.b, world.loner)
    for side in sides:
        readable = [side.tape, side.output_prefix + "summary.json"]
        for path in readable:
            for who in (side.analyst, side.viewer, world.admin):
                ok = await client.get("/api/files/download", params={"path": path}, headers=who)
                assert ok.status_code == 200, (path, ok.text)
        for other in sides:
            if other is side:
                continue
            for path in readable:
                for who in (other.analyst, other.viewer):
                    hidden = await client.get(
                        "/api/files/download", params={"path": path}, headers=who
                    )
                    assert _error(hidden) == _error(missing), path


async def test_run_reads_of_other_teams_are_404_like_missing_runs(
    client: httpx.AsyncClient, world: World
) -> None:
    absent = str(uuid.uuid4())
    sides = (world.a, world.b, world.loner)
    suffixes = ("", "/facts", "/exceptions")
    for side in sides:
        for who in (side.analyst, side.viewer):
            runs = await client.get("/api/pipeline/runs", headers=who)
            assert [r["id"] for r in runs.json()["items"]] == [side.run_id]
            assert runs.json()["total"] == 1
            done = await client.get(
                "/api/pipeline/runs", params={"status": "completed"}, headers=who
            )
            assert done.json()["total"] == 1
            for suffix in suffixes:
                own = await client.get(f"/api/pipeline/runs/{side.run_id}{suffix}", headers=who)
                assert own.status_code == 200, own.text
            facts = await client.get(f"/api/pipeline/runs/{side.run_id}/facts", headers=who)
            assert facts.json()["total"] == 10
            missing = await client.get(f"/api/pipeline/runs/{absent}", headers=who)
            assert missing.status_code == 404
            for other in sides:
                if other is side:
                    continue
                for suffix in suffixes:
                    hidden = await client.get(
                        f"/api/pipeline/runs/{other.run_id}{suffix}", headers=who
                    )
                    assert _error(hidden) == _error(missing), suffix
    every = await client.get("/api/pipeline/runs", headers=world.admin)
    assert {r["id"] for r in every.json()["items"]} == {s.run_id for s in sides}
    assert every.json()["total"] == 3
    for side in sides:
        for suffix in suffixes:
            read = await client.get(
                f"/api/pipeline/runs/{side.run_id}{suffix}", headers=world.admin
            )
            assert read.status_code == 200


async def test_writes_reach_only_what_the_caller_reads(
    client: httpx.AsyncClient, world: World, app: FastAPI
) -> None:
    # A run on another team's tape: the same 404 as a tape that does not exist.
    absent = await client.post(
        "/api/pipeline/run",
        json={"input_path": world.b.tape.replace("tape.csv", "absent.csv")},
        headers=world.b.analyst,
    )
    assert absent.status_code == 404
    for other in (world.a, world.loner):
        refused = await client.post(
            "/api/pipeline/run", json={"input_path": other.tape}, headers=world.b.analyst
        )
        assert _error(refused) == _error(absent)
    # Uploading (even with overwrite) a name another team uses writes to one's own scope.
    replaced = await client.post(
        "/api/files/upload",
        params={"overwrite": "true"},
        files={"file": ("tape.csv", b"x,y\n1,2\n", "text/csv")},
        headers=world.b.analyst,
    )
    assert replaced.json()["path"] == world.b.tape
    untouched = await client.get(
        "/api/files/download", params={"path": world.a.tape}, headers=world.a.viewer
    )
    assert untouched.content == KNOWN_TAPE
    # Admins may run any tape; the run belongs to the admin's own scope.
    by_admin = await client.post(
        "/api/pipeline/run", json={"input_path": world.a.tape}, headers=world.admin
    )
    assert by_admin.status_code == 202
    await app.state.runner.join()
    runs = await client.get("/api/pipeline/runs", headers=world.a.viewer)
    assert runs.json()["total"] == 1


async def test_runs_from_before_scoping(
    client: httpx.AsyncClient, world: World, app: FastAPI, make_user: UserFactory
) -> None:
    """Rows the migration left without a team: their creator (when known) and admins."""
    loner_id = (await client.get("/api/auth/me", headers=world.loner.analyst)).json()["id"]
    teamed_id = (await client.get("/api/auth/me", headers=world.a.analyst)).json()["id"]
    database: Database = app.state.db
    runs = {
        "loner": PipelineRun(status=RunStatus.COMPLETED, input_path="inputs/old.csv",
                             created_by=loner_id),
        "teamed": PipelineRun(status=RunStatus.COMPLETED, input_path="inputs/old.csv",
                              created_by=teamed_id),
        "nobody": PipelineRun(status=RunStatus.COMPLETED, input_path="inputs/old.csv"),
    }  # fmt: skip
    async with database.session() as session:
        session.add_all(runs.values())
    ids = {name: str(run.id) for name, run in runs.items()}
    readers = {
        "loner": world.loner.analyst,
        "teamed": world.a.analyst,
    }
    for name, headers in readers.items():
        listed = await client.get("/api/pipeline/runs", headers=headers)
        assert ids[name] in {r["id"] for r in listed.json()["items"]}
        assert (await client.get(f"/api/pipeline/runs/{ids[name]}", headers=headers)).is_success
    for headers in (world.a.viewer, world.b.analyst, world.loner.analyst, world.a.analyst):
        hidden = await client.get(f"/api/pipeline/runs/{ids['nobody']}", headers=headers)
        assert hidden.status_code == 404
    hidden = await client.get(f"/api/pipeline/runs/{ids['loner']}", headers=world.a.viewer)
    assert hidden.status_code == 404
    for run_id in ids.values():
        read = await client.get(f"/api/pipeline/runs/{run_id}", headers=world.admin)
        assert read.status_code == 200
    # A file stored before scoping (no scope segment) is an admin's alone.

    async def body() -> Any:
        yield b"a,b\n1,2\n"

    await app.state.storage.save("inputs/legacy.csv", body())
    for headers in (world.a.analyst, world.loner.analyst):
        assert "inputs/legacy.csv" not in _paths(await client.get("/api/files", headers=headers))
        legacy = await client.get(
            "/api/files/download", params={"path": "inputs/legacy.csv"}, headers=headers
        )
        assert legacy.status_code == 404
    assert "inputs/legacy.csv" in _paths(await client.get("/api/files", headers=world.admin))


async def test_changing_team_changes_what_a_user_reads(
    client: httpx.AsyncClient, world: World, admin_headers: Headers
) -> None:
    me = (await client.get("/api/auth/me", headers=world.a.viewer)).json()
    b_team = (await client.get("/api/auth/me", headers=world.b.viewer)).json()["sales_team_id"]
    moved = await client.patch(
        f"/api/users/{me['id']}", json={"sales_team_id": b_team}, headers=admin_headers
    )
    assert moved.status_code == 200
    runs = await client.get("/api/pipeline/runs", headers=world.a.viewer)
    assert [r["id"] for r in runs.json()["items"]] == [world.b.run_id]
    gone = await client.get(f"/api/pipeline/runs/{world.a.run_id}", headers=world.a.viewer)
    assert gone.status_code == 404
    assert _paths(await client.get("/api/files", headers=world.a.viewer)) == [world.b.tape]
