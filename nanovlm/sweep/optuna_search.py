"""`search: optuna`: Tune's OptunaSearch (TPE) fed our trials' reports. Imported only for
optuna sweeps (optuna is an extra: pip install 'nanovlm-ray[optuna]')."""

from __future__ import annotations

from typing import Any, Optional

from ray.tune.search.optuna import OptunaSearch


class EvaluatedOptunaSearch(OptunaSearch):
    """OptunaSearch for trials whose reports hold the metric only at evaluations: a report
    without it (a training step) is not passed on (OptunaSearch would fail on it), and a trial
    whose last report lacks it completes with the last value it reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_value: dict[str, float] = {}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            self._last_value[trial_id] = result[self.metric]
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict[str, Any]] = None, error: bool = False) -> None:
        if result is not None and self.metric not in result and trial_id in self._last_value:
            result = {**result, self.metric: self._last_value[trial_id]}
        super().on_trial_complete(trial_id, result, error)
