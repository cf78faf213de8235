"""Exceptions raised by the data pipeline.

Every message names the fix (usually a command to run). All of them derive from `DataError`, which is a
`ValueError`, so callers that only want "bad data input" can catch that.
"""

from __future__ import annotations


class DataError(ValueError):
    """Base class of every error the data pipeline raises on purpose."""


class CorpusMissingError(DataError):
    """The corpus (or cache) directory does not exist or holds no text."""


class EmptyCorpusError(CorpusMissingError):
    """The corpus exists but has no documents (or an empty split)."""


class EncodingError(DataError):
    """An input file is not valid UTF-8."""


class VocabMismatchError(DataError):
    """The vocabulary does not match the one the token cache was built with."""


class SeqLenError(DataError):
    """A requested sequence length is incompatible with the token cache."""


class FetchError(DataError):
    """A package could not be downloaded or extracted."""
