"""bmojo: B'MOJO hybrid state-space language models with eidetic and fading memory."""

from bmojo.config import PRESETS, ModelConfig
from bmojo.models import LanguageModel, ModelCache, ModelOutput

__version__ = "0.1.0"

__all__ = ["PRESETS", "LanguageModel", "ModelCache", "ModelConfig", "ModelOutput", "__version__"]
