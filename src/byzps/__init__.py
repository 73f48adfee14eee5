"""byzps: Byzantine-robust distributed training with a parameter server over TCP.

``byzps.Task`` is the base class of a user's task (see :mod:`byzps.task`); it is imported on
first use so that ``import byzps`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy ``byzps.Task`` / ``byzps.TaskError`` (PEP 562)."""
    if name in ("Task", "TaskError"):
        from byzps import task

        return getattr(task, name)
    raise AttributeError(f"module 'byzps' has no attribute {name!r}")
