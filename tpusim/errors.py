"""User-facing errors: each becomes one line on stderr and exit code 2 in the CLI."""


class TpusimError(Exception):
    """Bad input that the user can fix; the message names the file, node or config key."""


class ConfigError(TpusimError):
    """A configuration file or override is invalid."""


class ModelError(TpusimError):
    """An ONNX model cannot be read or lowered."""


class DataError(TpusimError):
    """Calibration or input data is unusable."""


class OutputError(TpusimError):
    """An output file or folder cannot be written where the user asked."""


class TpusimWarning(UserWarning):
    """Something the user must not miss that does not stop the run; the CLI prints it as one line."""


class CalibrationDataWarning(TpusimWarning):
    """Calibration data that tpusim accepted but that weakens the ranges or the fidelity figures."""
