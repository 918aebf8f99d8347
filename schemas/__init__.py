"""The sagabus wire contract: versioned message models and the envelope that carries them."""

from schemas.base import Message
from schemas.envelope import Envelope, HeaderNames
from schemas.registry import REGISTRY, UnknownMessageType, model_for

__all__ = [
    "REGISTRY",
    "Envelope",
    "HeaderNames",
    "Message",
    "UnknownMessageType",
    "model_for",
]
