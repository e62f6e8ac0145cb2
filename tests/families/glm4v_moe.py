"""glm4v_moe (GLM-4.5V; tiny, built from configs in tests/families/_glm.py): GLM-4.1V's tower and prompts on a
decoder with a dense first layer and routed experts, partial half-split rotary."""

from families._glm import GlmFamily

FAMILY = GlmFamily("glm4v_moe")
