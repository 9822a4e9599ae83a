"""The stacked engine: M models of one MLP architecture as stacked tensors (see `engine`)."""
