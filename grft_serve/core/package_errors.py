"""Why a task package was rejected: one exception class per problem, each with the HTTP status and
the error code the serving app answers with (``{"error": {"code", "message"}}``)."""
from __future__ import annotations

__all__ = [
    "PackageError", "NotSafetensorsError", "TruncatedPackageError", "PickleContentError", "UnsupportedFormatError",
    "MetadataError", "PreprocessingError", "EmptyPackageError", "UnknownModuleError", "ShapeMismatchError",
    "InvalidIndicesError", "DtypeError", "NonFiniteError", "ValueRangeError", "FingerprintMismatchError",
    "PreprocessingMismatchError", "PreprocessingUnrunnableError", "PackageTooLargeError", "MetadataTooLargeError",
    "TaskKindMismatchError",
]


class PackageError(ValueError):
    """A task package was rejected. ``status`` is the HTTP status the serving app answers with."""

    status = 422
    code = "invalid_package"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class NotSafetensorsError(PackageError):
    status, code = 400, "not_safetensors"


class TruncatedPackageError(PackageError):
    status, code = 400, "truncated"


class PickleContentError(PackageError):
    status, code = 400, "pickle_content"


class UnsupportedFormatError(PackageError):
    status, code = 422, "unsupported_format_version"


class MetadataError(PackageError):
    status, code = 422, "bad_metadata"


class PreprocessingError(MetadataError):
    status, code = 422, "bad_preprocessing"


class EmptyPackageError(PackageError):
    status, code = 422, "empty_package"


class UnknownModuleError(PackageError):
    status, code = 422, "unknown_module"


class ShapeMismatchError(PackageError):
    status, code = 422, "shape_mismatch"


class InvalidIndicesError(PackageError):
    status, code = 422, "invalid_indices"


class DtypeError(PackageError):
    status, code = 422, "bad_dtype"


class NonFiniteError(PackageError):
    status, code = 422, "non_finite"


class ValueRangeError(PackageError):
    status, code = 422, "value_out_of_range"


class FingerprintMismatchError(PackageError):
    status, code = 409, "base_fingerprint_mismatch"


class PreprocessingMismatchError(PackageError):
    status, code = 422, "preprocessing_mismatch"


class PreprocessingUnrunnableError(PackageError):
    """The base cannot run the task's preprocessing (a dry run failed, or it is over the pixel budget)."""

    status, code = 422, "preprocessing_unrunnable"


class PackageTooLargeError(PackageError):
    status, code = 413, "too_large"


class TaskKindMismatchError(PackageError):
    """A generation package sent to a classification backbone, or the reverse."""

    status, code = 422, "task_kind_mismatch"


class MetadataTooLargeError(PackageError):
    status, code = 413, "metadata_too_large"
