"""Models: loading base models, adapters and quantization, and building tiny random models for tests and demos."""
