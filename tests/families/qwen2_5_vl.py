"""qwen2_5_vl (tiny, built from configs in tests/families/_qwen.py): images of different sizes, video frames."""

from families._qwen import QwenFamily

FAMILY = QwenFamily("qwen2_5_vl")
