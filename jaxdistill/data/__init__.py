"""Training data: trace formats, chat rendering with loss masks, sources and packing."""
