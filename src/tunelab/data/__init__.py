"""Data: files -> validated rows -> canonical conversations -> token ids and loss masks."""
