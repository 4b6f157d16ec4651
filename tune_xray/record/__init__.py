"""What a search leaves, named and typed once (issue 40): `names` holds every name that more than one room uses —
statuses, the keys of a trial's reports and configs, the experiment directory's files, the costs — and imports
nothing, as Ray's `ray.tune.result` does for Tune. Readers (the report, the ensemble, predict) take their names from
here, so reading a finished search never loads Ray or Optuna."""
