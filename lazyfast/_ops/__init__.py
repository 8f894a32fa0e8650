"""Python wrappers of the compiled ops, one file per op family (wrapper, fake kernel, autograd):
two_layer (the four two-layer ops), hadamard_gram (``hadamard_gram_sum``), gram."""
