"""The project's exceptions. Each carries one line a user can act on; the CLI prints it without a traceback."""


class SqueezeError(Exception):
    """Base class: any error squeeze reports to a user."""


class FormatError(SqueezeError):
    """An artifact is malformed, truncated or damaged."""


class RecipeError(SqueezeError):
    """A recipe file has an unknown key or an invalid value."""


class CheckpointError(SqueezeError):
    """A checkpoint cannot be read safely, or holds tensors squeeze cannot compile."""
