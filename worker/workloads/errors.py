"""The one error type of the workloads package: a bad model or dataset config, or unreadable data."""


class WorkloadError(ValueError):
    """A model or dataset that cannot be built or loaded; ``str()`` is one line naming the config key
    (``model.name``, ``data.root``, ...) or the file, and the problem."""


def one_line(text: object) -> str:
    """``text`` with its line breaks folded, for messages that embed another error."""
    return " ".join(str(text).split())
