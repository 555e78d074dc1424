"""Prefect flows: orchestration only; the work lives in ``ood_core`` behind ``tasks``.

The flow is ``flows.synth_ood.synth_ood`` (imported lazily so that ``synth-ood status`` and
``synth-ood verify`` start without loading Prefect).
"""


def __getattr__(name: str):
    if name == "synth_ood":
        from flows.synth_ood import synth_ood

        return synth_ood
    raise AttributeError(name)
