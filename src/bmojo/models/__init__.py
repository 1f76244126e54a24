"""Models and their decoding caches."""

from bmojo.models.cache import ModelCache
from bmojo.models.lm import LanguageModel, ModelOutput
from bmojo.models.sampling import sample_next_token

__all__ = ["LanguageModel", "ModelCache", "ModelOutput", "sample_next_token"]
