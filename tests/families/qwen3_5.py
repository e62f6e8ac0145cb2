"""qwen3_5 (tiny, built from configs in tests/families/_qwen.py): Qwen3-VL's tower and M-RoPE (no DeepStack) on a
hybrid decoder, linear-attention (Gated DeltaNet) layers 0-2 and 4-5, full attention at layer 3."""

from families._qwen import QwenFamily

FAMILY = QwenFamily("qwen3_5")
