"""lalmtool: audio-token compression for large audio language models."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``lalmtool.Transcriber`` (imported on first use: the package imports no torch)."""
    if name == "Transcriber":
        from .transcribe import Transcriber

        return Transcriber
    raise AttributeError(f"module 'lalmtool' has no attribute {name!r}")
