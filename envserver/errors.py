"""The exception environments and handlers raise to answer a request with a coded error."""

from __future__ import annotations

from .protocol import ErrorCode, ErrorInfo


class ServerError(Exception):
    """An error the client should see: a code from the protocol table and a message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message)
