"""MatMamba-Vision: nested (Matryoshka) Mamba2 vision encoders."""
from .config import CONFIGS, LEVELS, MatMambaVisionConfig, get_config
from .cost import Cost, submodel_cost
from .hub import DEFAULT_MODEL_DIR, from_pretrained, load_model, save_pretrained, weights_hash
from .model import MatMambaVision
from .registry import create_model

__all__ = ["CONFIGS", "LEVELS", "MatMambaVisionConfig", "get_config", "Cost", "submodel_cost", "DEFAULT_MODEL_DIR",
           "from_pretrained", "load_model", "save_pretrained", "weights_hash", "MatMambaVision", "create_model"]
