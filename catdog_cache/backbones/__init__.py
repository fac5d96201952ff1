"""The built-in backbone plugins. They are registered through the `catdog_cache.backbones` entry-point group in
pyproject.toml, exactly as a third-party package would register its own (see docs/extract.md, "Backbone plugins").
backbone.BUILTIN names the same entry points for a source tree without installed metadata. Nothing is imported
here: the plugins import backbone.py, and backbone.py never imports them by name."""
