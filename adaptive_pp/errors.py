"""Errors the runtime raises; each names the stage and, where it applies, the micro-batch."""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A pipeline step failed; ``stage``, ``peer``, ``microbatch``, ``layer`` say where."""

    def __init__(
        self,
        message: str,
        *,
        stage: int | None = None,
        peer: int | None = None,
        microbatch: int | None = None,
        layer: int | None = None,
    ) -> None:
        super().__init__(message)
        self.stage, self.peer, self.microbatch, self.layer = stage, peer, microbatch, layer


class PeerGone(PipelineError):
    """A neighbouring stage died or closed its link while this stage waited on it."""


class PipelineTimeout(PipelineError):
    """A receive waited longer than the configured timeout (a stuck peer)."""


class VersionMismatch(PipelineError):
    """A message was computed with other weights than the receiver expects."""


class StageFailure(PipelineError):
    """User code (a layer, the loss) raised inside a stage."""


class NonFiniteLoss(PipelineError):
    """The loss of a micro-batch is NaN or infinite."""
