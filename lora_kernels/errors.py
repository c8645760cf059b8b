"""The package's own exception, in a module of its own so that every backend can raise it without
importing ``backends`` (which imports the backends' loaders lazily: no import circle)."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run these inputs; the message says why."""
