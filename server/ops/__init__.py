"""What runs a model faster or smaller without changing the request: compiled blocks, quantization,
attention backends, dtypes."""
