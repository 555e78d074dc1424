"""synth-ood core library: config, storage, model backends, stage logic, scores, metrics, report.

Never imports Prefect: everything here runs with plain function calls.
"""

__version__ = "0.1.0"
