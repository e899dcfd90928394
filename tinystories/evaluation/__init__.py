"""Stage 5, measuring a model and a run: the `eval` command, grammar by Link Grammar, story statistics, the
doctor's checks and loss plots."""
