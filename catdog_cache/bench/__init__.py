"""`catdog-cache bench`: suite.py (the README's rows), pipeline.py (extract against a plain loop), rerun.py (a rerun
against a bare walk), scale.py (fit at millions of rows), tars.py (tar input). Nothing is imported here."""
