"""The one base class of errors the user can fix: bad params, data, weights or stale artefacts."""


class InputError(Exception):
    """What was wrong, what is accepted and what to run; stages print it as one line."""


class BackboneError(InputError, ValueError):
    """A backbone, layer or weights request that cannot be met."""
