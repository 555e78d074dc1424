"""A stage's tag concurrency limit held by a dead run (issue 18, item 2): the slot of a run that
ended is released before the stage queues on it, and a wait on a full limit is logged with the
limit's name, its holders and what to do (real Prefect, its local API)."""

from __future__ import annotations

import uuid

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.runtime import task_run

from tasks.stage_tasks import slot_check_task

pytestmark = pytest.mark.slow


@task
def _holder_id() -> str:
    return task_run.id


@flow
def _a_run_that_took_a_slot() -> str:
    return _holder_id()


@flow
def _check(stage: str) -> dict:
    return slot_check_task(stage)


def _occupy(client, tag: str, holder: str) -> None:
    client.increment_concurrency_slots_with_lease(
        names=[f"tag:{tag}"], slots=1, mode="concurrency", lease_duration=300,
        holder=ConcurrencyLeaseHolder(type="task_run", id=uuid.UUID(str(holder))),
    )  # fmt: skip


def test_a_slot_held_by_a_finished_run_is_released_and_a_live_holder_is_named():
    stage = f"slot{uuid.uuid4().hex[:6]}"
    tag = f"stage-{stage}"
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=1)
        assert _check(stage) == {"limit": tag, "released": [], "waiting_on": []}  # free: nothing to say
        # a run that ended (Completed here, as a killed one once marked Crashed) without giving it back
        ended = _a_run_that_took_a_slot()
        _occupy(client, tag, ended)
        assert len(client.read_concurrency_limit_by_tag(tag).active_slots) == 1
        result = _check(stage)
        assert len(result["released"]) == 1 and "_holder_id" in result["released"][0], result
        assert client.read_concurrency_limit_by_tag(tag).active_slots == []
        # a holder still running is never freed: the wait is reported instead
        flow_run = client.create_flow_run(_a_run_that_took_a_slot, state=None)
        from prefect.states import Running

        client.set_flow_run_state(flow_run.id, Running(), force=True)
        live = client.create_task_run(_holder_id, flow_run_id=flow_run.id, dynamic_key="0", state=Running())
        _occupy(client, tag, live.id)
        result = _check(stage)
        assert result["released"] == [] and len(result["waiting_on"]) == 1 and "Running" in result["waiting_on"][0]
        assert len(client.read_concurrency_limit_by_tag(tag).active_slots) == 1
