"""The sagabus wire contract: versioned message models and the envelope that carries them."""

from schemas.base import Message, message_type
from schemas.envelope import Envelope, HeaderNames
from schemas.registry import REGISTRY, UnknownMessageType, model_for

__all__ = [
    "REGISTRY",
    "Envelope",
    "HeaderNames",
    "Message",
    "UnknownMessageType",
    "message_type",
    "model_for",
]
