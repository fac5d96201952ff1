"""What an INPUT is. folder.py: an image folder (ImageFolder classes, Kaggle flat names) as sorted samples;
spec.py: tar shards named by a path, a brace pattern, a listing or a URL, and their identity for reruns;
tars.py: the samples streamed from WebDataset tars; decode.py: the safe decoding of one file's bytes and its views.
Nothing is imported here: each module is imported by its own name."""
