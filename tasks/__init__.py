"""Thin Prefect tasks around ``ood_core.pipeline``: one task = one shard or one stage-level step."""

from tasks.stage_tasks import (
    finalize_task,
    pending_shards_task,
    plan_task,
    preflight_task,
    prepare_run_task,
    prune_rounds_task,
    shard_group_task,
    shard_task,
    slot_check_task,
)

__all__ = [
    "finalize_task", "pending_shards_task", "plan_task", "preflight_task", "prepare_run_task", "prune_rounds_task",
    "shard_group_task", "shard_task", "slot_check_task",
]
