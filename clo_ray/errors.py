"""Exception types: every error a user can cause says where (file, row, field) and what to do."""


class CloRayError(Exception):
    """Base class for errors raised by clo-ray."""


class SpecError(CloRayError):
    """The sweep spec is invalid. The message names the YAML path (``models[2].name``) and value."""


class CorpusError(CloRayError):
    """A corpus file is malformed. The message names the file, line/row and field."""


class ModelResolutionError(CloRayError):
    """A model reference cannot be resolved (unknown built-in, missing directory, offline hub)."""


class ModuleSelectionError(CloRayError):
    """A trainable-module selector matched no parameter of the model."""


class LanguageError(CloRayError):
    """A language code is unknown to the registry or unsupported by a component."""


class StorageError(CloRayError, ValueError):
    """A storage URI is unusable (unknown scheme, no bucket, unwritable location)."""


class StorageWriteError(StorageError, OSError):
    """An output could not be written (disk full, no permission, ...). A StorageError (the
    message names the target and what to do), and still an OSError (``errno`` kept), like
    ``io.UnsupportedOperation``, so code that catches the filesystem's own error keeps working."""
