"""One exception family. Every message is a single line a user can act on (it names the file or key at fault)."""


class AitLlmError(Exception):
    """Base of every error this package raises on purpose. ``str(err)`` is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class FormatError(AitLlmError):
    """A file's content is not what its format says (bad .bin header, bad JSON, refused pickle, ...)."""


class LayoutError(AitLlmError):
    """A dump directory is not laid out as an ATB or torch dump (missing topology, no token folders, ...)."""


class MappingError(AitLlmError):
    """An op_mapping_file.json is invalid (names the key at fault)."""


class ToleranceError(AitLlmError):
    """A tolerance specification is invalid (unknown metric, non-numeric bound, ...)."""


class ExecError(AitLlmError):
    """The user's inference command (--ait-exec) failed, hung, or wrote no dump."""
