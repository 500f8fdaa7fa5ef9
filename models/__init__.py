"""The model library (``ppl.models``): classic graphical models written in the DSL."""
