"""The one exception type of the converters: bad input, reported as one line by the tools."""


class ConversionError(Exception):
    """Input the converters cannot use (wrong architecture, missing shard, shape mismatch, ...).

    The message is a single line; the tools print it as ``<prog>: error: <message>`` and exit 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
