"""The error every deployment helper raises when a process or a ``flwr`` command fails."""


class DeploymentError(RuntimeError):
    """A SuperLink / SuperNode process or a ``flwr`` command failed."""
