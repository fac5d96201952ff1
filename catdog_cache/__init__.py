"""catdog-cache: cache frozen ImageNet features (VGG16 fc7 by default) once, train the head in seconds.

Python API (imported lazily, so `catdog-cache --help` stays instant):

    from catdog_cache import extract, fit, predict
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> (module, function). The functions share their modules' names (extract.extract, fit.fit...), so the
# package resolves these names itself: `catdog_cache.extract` is the function, `catdog_cache.extract` in
# sys.modules (and `from catdog_cache.extract import ...`) the module.
_API = {
    "extract": ("engines.dispatch", "extract"),
    "fit": ("fit", "fit"),
    "predict": ("score.predict", "predict"),
    "verify": ("verify", "verify"),
    "export": ("score.scorer", "export"),
    "preview": ("score.preview", "preview"),
    "get_backbone": ("backbone", "get_backbone"),
    "ExtractConfig": ("extract.config", "ExtractConfig"),
    "FitConfig": ("fit", "FitConfig"),
    "parse_weights": ("backbone", "parse_weights"),
}
__all__ = sorted(_API)


class _Package(types.ModuleType):
    def __getattribute__(self, name: str):
        if name in _API:
            module, attr = _API[name]
            return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
