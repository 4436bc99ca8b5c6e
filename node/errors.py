"""Project exceptions: one type per way a stage can fail, caught once by whoever owns the stage."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """config.yaml is missing, unreadable or invalid; the message names the field."""


class InvalidInstance(NodeError):
    """A received or read DICOM instance cannot be used (bad UID, no pixel data, ...)."""


class SeriesRejected(NodeError):
    """A series cannot be analysed; the message is the reason that goes into the SR."""


class ModelError(NodeError):
    """The model directory is missing, inconsistent, or made for another preprocessing version."""


class InferenceFailed(NodeError):
    """The model could not classify the series."""


class SendFailed(NodeError):
    """The PACS did not accept the result (association refused, failure status, network error)."""


class PortUnavailable(NodeError):
    """The node cannot listen on a configured port (in use: the message names the holder)."""
