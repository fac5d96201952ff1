"""catdog-cache: cache frozen VGG16 fc7 activations once, train the Linear(4096, 2) head in seconds."""

__version__ = "0.1.0"
