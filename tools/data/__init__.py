"""Data builders: Fashion-MNIST, synthetic detection scenes, the trained reference models, the decoder LLMs, and
the corpus of third-party models with their calibration data (``real_models``)."""
