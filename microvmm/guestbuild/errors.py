"""The guest builder's exceptions."""

from __future__ import annotations


class GuestBuildError(Exception):
    """The image build cannot proceed; the message says why."""
