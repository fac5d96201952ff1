"""One extraction pipeline: config.py (options and the run's report) -> plan.py (what the cache holds, what to read,
for folders and tar shards alike) -> loader.py (decode workers) -> forward.py (the frozen backbone) -> the writer of
each kind of unit (folder_units.py, tar_units.py: cache shards, then a done marker) -> finish.py (the index).
folder.py and tars.py run a whole input in this process; engines/ distributes the same units elsewhere.
Nothing is imported here: each module is imported by its own name."""
