"""Hugging Face ``transformers`` interop (``pip install "bmojo[hf]"``).

Importing this module registers :class:`BMojoConfig` (``model_type = "bmojo"``) with ``AutoConfig`` and
:class:`BMojoForCausalLM` with ``AutoModelForCausalLM``.

There is one checkpoint format. :class:`BMojoForCausalLM` registers the children of a
:class:`~bmojo.models.lm.LanguageModel` (``embed``, ``blocks``, ``norm``, ``lm_head``) as its own, so both
classes have the same parameter names, and :meth:`bmojo.config.ModelConfig.to_json` writes the ``model_type``
transformers needs: a directory written by :meth:`LanguageModel.save_pretrained` loads with
``AutoModelForCausalLM.from_pretrained`` and one written by ``BMojoForCausalLM.save_pretrained`` loads with
:meth:`LanguageModel.from_pretrained`.

``generate()`` decodes through the model's own fixed-size :class:`~bmojo.models.cache.ModelCache`: the prompt
is prefilled once by the parallel path, then each new token costs one step of the recurrence, whatever the
context length (DESIGN.md §7). Greedy search and sampling are supported; beam search and assisted decoding,
which rewind or reorder a cache, are not. Sequences must not be padded (the model takes no attention mask).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from bmojo.config import HF_MODEL_TYPE, ModelConfig
from bmojo.models.cache import ModelCache
from bmojo.models.lm import LanguageModel

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_LOADING_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs", "conversion_errors")


class BMojoConfig(PreTrainedConfig):
    """A :class:`~bmojo.config.ModelConfig` as a transformers config: every model field is an attribute
    (validated by ``ModelConfig``), next to transformers' own settings. The usual transformers names are
    aliases of ours (``hidden_size`` is ``d_model``, ``tie_word_embeddings`` is ``tie_embeddings``, ...)."""

    model_type = HF_MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs = {self.attribute_map.get(key, key): value for key, value in kwargs.items()}
        model_config = ModelConfig.from_dict({name: kwargs.pop(name) for name in _MODEL_FIELDS if name in kwargs})
        super().__post_init__(**kwargs)
        for name, value in model_config.to_dict().items():
            setattr(self, name, value)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> BMojoConfig:
        """The transformers config of ``config`` (``kwargs``: transformers settings, e.g. ``dtype``)."""
        return cls(**config.to_dict(), **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The model fields as a validated :class:`~bmojo.config.ModelConfig`."""
        return ModelConfig.from_dict({name: getattr(self, name) for name in _MODEL_FIELDS})


@dataclass
class BMojoCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output; ``cache`` is a :class:`~bmojo.models.cache.ModelCache` and ``aux_loss``
    the innovation predictors' auxiliary loss, which ``loss`` (next-token cross-entropy) does not include:
    a trainer adds it with its own weight, as :class:`bmojo.training.Trainer` does."""

    aux_loss: Tensor | None = None


class BMojoForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`~bmojo.models.lm.LanguageModel` behind transformers' ``PreTrainedModel`` and ``GenerationMixin``.

    The language model itself is :attr:`language_model`; its children are registered on this module under their
    own names, so the two share parameters, state-dict keys and checkpoints."""

    config_class = BMojoConfig
    _input_embed_layer = "embed"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}  # applied when config.tie_word_embeddings
    _is_stateful = True  # no rewinding of the recurrent cache: rules out assisted decoding
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE]

    def __init__(self, config: BMojoConfig, language_model: LanguageModel | None = None):
        super().__init__(config)
        if language_model is None:
            language_model = LanguageModel(config.to_model_config())
        elif language_model.config != config.to_model_config():
            raise ValueError("language_model.config differs from config")
        # Kept out of the module tree (its children are registered below), so parameter names carry no prefix.
        self.__dict__["language_model"] = language_model
        for name, child in language_model.named_children():
            self.add_module(name, child)
        self.post_init()

    @classmethod
    def from_language_model(cls, model: LanguageModel) -> BMojoForCausalLM:
        """Wrap an existing model: the wrapper shares its parameters (no copy)."""
        return cls(BMojoConfig.from_model_config(model.config), model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: :class:`LanguageModel` initialises its weights when it is built; transformers' generic
        initialisation would undo its scheme (scaled residual projections, zero innovation predictor, Mamba-2's
        convolution)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """``forward`` creates the model's own :class:`ModelCache`; transformers must not make a ``DynamicCache``."""
        return False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, strict like :meth:`LanguageModel.from_pretrained`: a checkpoint with
        missing, unexpected or mis-shaped weights raises ``ValueError`` instead of loading with random weights."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {key: info[key] for key in _LOADING_PROBLEMS if info.get(key)}
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the weights do not match the config: {problems}")
        return (model, info) if want_info else model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: ModelCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool = False,
        return_dict: bool | None = None,
    ) -> BMojoCausalLMOutput | tuple:
        """Logits for ``input_ids [B, L]``, continuing from ``cache`` when given (updated in place, see
        :meth:`LanguageModel.forward`); ``use_cache`` without a cache prefills a new one. ``labels [B, L]``
        (``-100``: ignored) give ``loss``, shifted inside as in transformers. ``attention_mask`` may only be
        all ones: padding is not supported."""
        if cache is not None and not isinstance(cache, ModelCache):
            raise TypeError(f"cache must be the model's own ModelCache, got {type(cache).__name__}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded inputs are not supported (attention_mask has zeros): B'MOJO takes no attention "
                             "mask; give sequences of one length, or one sequence at a time")
        if cache is None and use_cache:
            cache = self.language_model.new_cache(input_ids.shape[0])
        out = self.language_model(input_ids, cache)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size)
        output = BMojoCausalLMOutput(loss=loss, logits=out.logits, cache=out.cache, aux_loss=out.aux_loss)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


AutoConfig.register(HF_MODEL_TYPE, BMojoConfig)
AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM)
