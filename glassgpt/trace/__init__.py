"""Explanation engines: each traces generated text back to the training data in its own way.

- knn.py: nearest training windows, ranked by BM25 over their words (default) or the model's embeddings
- spans.py: verbatim spans found in the training data (suffix array), OLMoTrace-style
- neurons.py: MLP neuron traces recorded by forward hooks, contrasted and ablated
"""
