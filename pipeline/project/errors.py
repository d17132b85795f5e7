"""The one base class of errors the user can fix: bad params, data, weights or stale artefacts."""

import difflib


def closest(name: str, names) -> str:
    """`; did you mean a, b?` for the valid names closest to a mistyped one, else ''."""
    near = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else ""


class InputError(Exception):
    """What was wrong, what is accepted and what to run; stages print it as one line."""


class BackboneError(InputError, ValueError):
    """A backbone, layer or weights request that cannot be met."""


class ClusterError(InputError):
    """A Ray cluster that cannot be reached in time, or that lacks what extract.ray asks for."""
