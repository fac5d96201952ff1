"""Scoring a trained head on any input extract takes (a folder, tar shards): inputs.py (the input resolved once),
features.py (its features in the head's caches, extracted through extract's read-only plan when missing), rows.py
(the cached rows scored), predict.py (CSV and submission rows), scorer.py (the head with or without its backbone;
export), outputs.py (CSV and submission files), preview.py (picture grids). Nothing is imported here."""
