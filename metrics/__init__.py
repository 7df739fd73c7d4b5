"""Pure tensor functions behind every detector: no model, no I/O, shapes in jaxtyping annotations."""
