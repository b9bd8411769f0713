"""Explanation engines: each traces generated text back to the training data in its own way.

- knn.py: nearest training windows in the model's own embedding space
- spans.py: verbatim spans found in the training data (suffix array), OLMoTrace-style
- neurons.py: MLP neuron traces recorded by forward hooks, contrasted and ablated
"""
