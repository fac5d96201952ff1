"""`catdog-cache audit`: what to look at in a labeled data set, from its feature cache alone. Stages, one module
each: neighbours (blockwise cosine top-k under a memory budget), labels (out-of-fold probabilities of the given
labels), duplicates (exact by sha256, near by cosine, within a cache and across caches), outliers (far from every
neighbour), sheets (contact sheets of what was found), report (CSV, JSON), run (audit itself). Nothing here moves or
deletes a file."""
