"""The cross-modal model: config, embeddings, encoder and heads."""

from .configuration import CrossModalConfig, config_from_experiment
from .encoder import CrossModalModel, EncoderOutput, IaisRequest

__all__ = ["CrossModalConfig", "CrossModalModel", "EncoderOutput", "IaisRequest", "config_from_experiment"]
