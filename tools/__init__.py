"""Developer scripts: Fashion-MNIST data and reference-model training (not part of the installed package)."""
