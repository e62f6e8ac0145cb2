"""glm4v (GLM-4.1V; tiny, built from configs in tests/families/_glm.py): images of different sizes, timestamped
video frames in the image placeholders, biased q/k/v, partial interleaved rotary, post-attention/post-MLP norms."""

from families._glm import GlmFamily

FAMILY = GlmFamily("glm4v")
