"""The one base class of errors the user can fix: bad params, data, weights or stale artefacts."""


class InputError(Exception):
    """What was wrong, what is accepted and what to run; stages print it as one line."""
