"""The ESP exception family (local errors only: wire input never raises)."""

from __future__ import annotations


class EspError(Exception):
    """Base of every error the ESP core raises."""


class EspConfigError(EspError, ValueError):
    """Bad SA parameters: key sizes, unknown transform, SPI or window range."""


class SequenceExhausted(EspError):
    """The outbound SA has used its last sequence number and must be replaced.

    RFC 4303 §3.3.3: a sender must not let the sequence number cycle; it
    has to set up a new SA instead.
    """
