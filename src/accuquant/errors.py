"""The one exception type that the command line turns into a one-line message."""


class AccuQuantError(Exception):
    """A problem with the user's input (a config value, a path, a file), not a bug.

    The command line prints ``accuquant: error: <message>`` and exits with status 2.
    """


class DivergenceError(AccuQuantError):
    """Calibration produced a non-finite loss, gradient or quantizer parameter; the message
    names the method, unit, iteration and quantity. The last checkpoint is kept."""


class ConfigError(AccuQuantError, ValueError):
    """An invalid configuration value; the message names the field."""
