"""Prefect flows: orchestration only; the work lives in ``ood_core`` behind ``tasks``."""

from flows.synth_ood import synth_ood

__all__ = ["synth_ood"]
