"""The results store (:mod:`mlake_core.results.store`): one folder per run, resumable."""

from mlake_core.results.store import RESULTS_ENV, Run, open_run, results_root

__all__ = ["RESULTS_ENV", "Run", "open_run", "results_root"]
