"""Exceptions that map to the contract's exit codes: 2 bad input, 1 runtime failure, 3 peer failed."""

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PEER_FAILED = 3


class UsageError(ValueError):
    """Bad input from the user (flags, files, model paths). One line, names the problem. Exit 2."""


class PeerFailure(RuntimeError):
    """Another rank died, hung or left the group. Exit 3."""
