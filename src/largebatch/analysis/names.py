"""Names of the explosion analysis's test architectures and activations (torch-free: the command
line's choices; the modules are built by ``architectures``)."""

ACTIVATIONS = ("relu", "leaky_relu", "elu", "selu", "gelu", "silu", "softplus", "dropout", "identity", "tanh")
ARCHITECTURES = ("mlp-bn", "mlp-ln", "vgg-bn", "resnet-bn", "transformer-ln")
