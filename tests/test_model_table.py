"""The one model-type table: every adapter names the transformers class of each model type it serves, the loader
and the FLOPs reader use it, and a type no adapter serves is refused everywhere with the supported list."""

from __future__ import annotations

import pytest
import transformers

import vtc
from vtc.adapters import ADAPTERS, adapter_class
from vtc.flops import ModelDims
from vtc.loading import model_class


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_each_served_type_names_the_class_transformers_registers_for_it(model_type):
    cls = model_class(model_type)
    # independent of vtc: the class's own config declares the same model type, and transformers' auto
    # mapping picks the same class for it
    assert cls.config_class.model_type == model_type
    auto = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
    assert auto == cls.__name__
    assert model_type in adapter_class(model_type).model_types


def test_a_type_without_adapter_is_refused_by_loader_and_flops():
    supported = vtc.supported_model_types()
    assert "vipllava" not in supported  # no adapter serves it, so nothing loads it
    with pytest.raises(ValueError, match=r"unsupported model_type='vipllava'; vtc supports \["):
        model_class("vipllava")
    with pytest.raises(ValueError, match="model_type='vipllava' has no vtc adapter"):
        ModelDims.from_hf_config(transformers.VipLlavaConfig())
    # the language model alone still reads
    dims = ModelDims.from_hf_config(transformers.VipLlavaConfig().text_config)
    assert (dims.d, dims.L, dims.vision_layers) == (4096, 32, 0)
