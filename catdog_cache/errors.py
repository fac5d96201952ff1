"""The project's exceptions. The CLI turns each into one clear line on stderr and a non-zero exit."""

from __future__ import annotations


class CatdogError(Exception):
    """A problem the user can fix; the message says what to do."""

    exit_code = 1


class InputError(CatdogError):
    """A missing or empty folder, an unknown option value, a file that is not what it claims."""


class CacheError(CatdogError):
    """A cache that is missing, damaged, from another schema, or built by another backbone."""


class ProvenanceMismatch(CacheError):
    """Cache, head or request disagree on how the features were made."""


class WeightsUnavailable(CatdogError):
    """ImageNet weights are not cached locally and cannot be downloaded."""


class CacheBusy(CacheError):
    """Another process holds the cache."""


class Interrupted(CatdogError):
    """Ctrl-C: work done so far was saved."""

    exit_code = 130


RAY_MISSING = "--engine ray needs Ray, which is not installed: pip install 'catdog-cache[ray]'"
