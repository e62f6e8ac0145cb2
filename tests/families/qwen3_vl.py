"""qwen3_vl (tiny, built from configs in tests/families/_qwen.py): images of different sizes, video frames, DeepStack on."""

from families._qwen import QwenFamily

FAMILY = QwenFamily("qwen3_vl")
