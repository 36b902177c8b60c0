"""The math of the algorithms as pure tensor functions (no Flower, no I/O): the sign
codec, the votes and the cross-probability estimator, example-weighted means, and the
trainable parameters as one flat vector. Algorithms, engines and benchmarks call them."""
