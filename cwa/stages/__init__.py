"""Stages: each turns a config object into one or more runs in the store (score, rank,
evaluate, perturb, and the chained ``run`` / ``demo``). The CLI calls exactly one function
here per command."""
