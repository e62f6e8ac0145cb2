"""qwen3_5_moe (tiny, built from configs in tests/families/_qwen.py): qwen3_5 with a sparse MoE MLP (4 experts, 2 per
token, a shared expert) in every decoder layer."""

from families._qwen import QwenFamily

FAMILY = QwenFamily("qwen3_5_moe")
