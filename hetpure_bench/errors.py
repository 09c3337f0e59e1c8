"""User-facing errors: the CLI prints their message as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or a missing/corrupt resource; the message alone must tell the user what to do."""


class DataNotFoundError(UserError):
    """A data set could not be found locally and could not be downloaded."""


class ChecksumError(UserError):
    """A file does not have the checksum it must have (corrupt, truncated or an HTML error page)."""


class DownloadError(UserError):
    """A download failed (offline, HTTP error)."""


class UnknownNameError(UserError):
    """A registry lookup with a name that is not registered."""
