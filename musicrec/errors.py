"""Errors that carry a message for a person: which file, what is wrong."""


class DataError(ValueError):
    """Input or artefact data that cannot be used; the message names the file and the problem."""
