"""The four stages; importing this package registers them in ``STAGES``."""

from ood_core.stages import elaborate, finetune, generate, sketch  # noqa: F401  (registers)
from ood_core.stages.base import (
    STAGE_ORDER,
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
)

__all__ = ["STAGE_ORDER", "STAGES", "ShardOutput", "ShardPlan", "Stage", "StageContext"]
