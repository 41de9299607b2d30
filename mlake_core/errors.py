"""Errors that mlake expects and reports to the user without a traceback."""


class MlakeError(Exception):
    """An expected failure caused by input or configuration (bad file, unknown option, ...).

    The message must name what is wrong (file, record index, option) and what to do about it.
    The command-line interface prints it on one line and exits with status 2.
    """


class DataError(MlakeError):
    """A MLaKE data file is missing, malformed or inconsistent."""


class ConfigError(MlakeError):
    """An option or configuration value is invalid (unknown language, version, model, ...)."""
