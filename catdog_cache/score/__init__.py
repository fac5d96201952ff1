"""Scoring a trained head: predict.py (an input's features, cached through extract's planner, scored into a CSV and
a Kaggle submission), scorer.py (the head with or without its backbone; export), outputs.py (CSV and submission
files), preview.py (picture grids of predictions). Nothing is imported here."""
