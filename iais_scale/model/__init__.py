"""The cross-modal model: config, embeddings, vision backbone, encoder and heads.

Importing this package registers the config and model with transformers' Auto classes
(``AutoConfig``/``AutoModel`` know ``iais_single_stream``), and makes ``save_pretrained`` write the
modelling code with ``auto_map`` (``hub.py``): saved folders load with ``trust_remote_code=True``
where this package is not installed.
"""

from . import encoder as _encoder
from .configuration import CrossModalConfig
from .encoder import CrossModalModel, EncoderOutput, IaisRequest
from .experiment import config_from_experiment
from .hub import register_auto_classes, write_remote_code

register_auto_classes()
_encoder.REMOTE_CODE_WRITER = write_remote_code

__all__ = ["CrossModalConfig", "CrossModalModel", "EncoderOutput", "IaisRequest", "config_from_experiment"]
