"""The cross-modal model: config, embeddings, vision backbone, encoder and heads.

Importing this package registers the config and model with transformers' Auto classes
(``AutoConfig``/``AutoModel`` know ``iais_single_stream``), and makes ``save_pretrained`` write the
modelling code with ``auto_map`` (``hub.py``): saved folders load with ``trust_remote_code=True``
where this package is not installed.
"""

import importlib.util


def _check_torchvision() -> None:
    """transformers imports torchvision whenever one is installed, and one built for another torch
    (PyPI's torchvision is built for PyPI's CUDA torch; beside the CPU wheel it lacks its operators)
    fails deep inside that import. Say so, and what to do, in one line instead."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        import torch

        raise ImportError(
            f"torchvision is installed but does not work with torch {torch.__version__} ({type(e).__name__}: {e}):"
            " it was built for another torch. Remove it (`pip uninstall torchvision timm`: only timm backbones,"
            " the [vision] extra, need them) or install the torchvision built for this torch") from None


_check_torchvision()

from . import encoder as _encoder  # noqa: E402
from .configuration import CrossModalConfig  # noqa: E402
from .encoder import CrossModalModel, EncoderOutput, IaisRequest  # noqa: E402
from .experiment import config_from_experiment  # noqa: E402
from .hub import register_auto_classes, write_remote_code  # noqa: E402

register_auto_classes()
_encoder.REMOTE_CODE_WRITER = write_remote_code

__all__ = ["CrossModalConfig", "CrossModalModel", "EncoderOutput", "IaisRequest", "config_from_experiment"]
