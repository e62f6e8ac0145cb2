"""qwen3_vl_moe (tiny, built from configs in tests/families/_qwen.py): qwen3_vl (DeepStack on) with a sparse MoE MLP
(4 experts, 2 per token) in every decoder layer but layer 1, which keeps the dense MLP."""

from families._qwen import QwenFamily

FAMILY = QwenFamily("qwen3_vl_moe")
