"""The project's error types: what the command line reports as one line with exit status 2.

Everything raised where input, settings or the environment is checked derives from
`EhrmotorError`; anything else is an internal bug and keeps its traceback. Errors about bad input
also derive from `ValueError`, so library callers that catch `ValueError` keep working.
"""

from __future__ import annotations

import errno
import os
import re


class EhrmotorError(Exception):
    """A problem the user can fix; its message is one line naming the file, setting or value."""


class InputError(EhrmotorError, ValueError):
    """Bad input data, arguments or settings."""


class ConfigError(InputError):
    """A config file or value that cannot be used."""


class OutputError(EhrmotorError):
    """An output path that cannot be written without destroying something we did not create."""


class WorkFolderBusy(EhrmotorError):
    """Another ehrmotor process holds the work folder's lock."""


class ArtifactMismatch(EhrmotorError):
    """An existing artifact was produced from other inputs or settings."""


class OntologyError(InputError):
    """An Athena folder, codes metadata or saved ontology that cannot be used; names the file."""


class BundleError(InputError):
    """A model bundle that is missing, incomplete or corrupt."""


class PretrainError(InputError):
    """Missing or unusable input for pretraining (one line; the CLI exits with status 2)."""


def one_line(error: BaseException) -> str:
    """An exception's text with every run of whitespace (newlines included) made one space."""
    return " ".join(str(error).split())


# Longest value (code, path, cell) quoted whole in a message; longer ones are cut by `cut`.
MAX_QUOTED = 80


def cut(value: object, limit: int = MAX_QUOTED) -> str:
    """`str(value)`, or its first `limit` characters and "… (N chars)" when longer.

    Used wherever data values (codes, text values, paths) are put into an error or warning, so a
    runaway value (a 10 MB code) keeps the message one readable line.
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def first_line(error: BaseException) -> str:
    """The first line of an exception's text (polars and transformers add multi-line hints)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Failures of the machine rather than the program: full disk, file size limit, read-only or
# forbidden paths. They are reported as one line naming the file, never as a traceback.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
    errno.EMFILE, errno.ENFILE, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
})
_OS_ERROR_TEXT = re.compile(r"os error (\d+)|errno (\d+)", re.IGNORECASE)


def environment_errno(error: BaseException) -> int | None:
    """The errno of a full disk, size limit or permission failure behind `error`, else None.

    Looks through the exception's causes and, for libraries that report I/O failures as text
    (polars: "... (os error 28)"), through their messages.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            return current.errno
        for match in _OS_ERROR_TEXT.finditer(str(current)):
            number = int(match.group(1) or match.group(2))
            if number in ENVIRONMENT_ERRNOS:
                return number
        current = current.__cause__ or current.__context__
    return None


def environment_message(error: BaseException, path: object | None = None) -> str | None:
    """One line for an environment failure ("PATH: No space left on device"), else None."""
    number = environment_errno(error)
    if number is None:
        return None
    where = path if path is not None else getattr(error, "filename", None)
    reason = os.strerror(number)
    return f"{where}: {reason}" if where else reason
