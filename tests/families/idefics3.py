"""idefics3 (tiny, built from configs in tests/families/_idefics3.py): tiled images of different tile counts with
their text markers, letterboxed global images."""

from families._idefics3 import Idefics3Family

FAMILY = Idefics3Family("idefics3")
