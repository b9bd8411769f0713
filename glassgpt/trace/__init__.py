"""Explanation engines: each traces generated text back to the training data in its own way.

- spans.py: verbatim spans found in the training data, OLMoTrace-style (`glassgpt trace-spans`), over
  suffix_array.py (suffix arrays and searches), span_rules.py (which spans count) and span_index.py
  (the sharded index on disk)
- knn.py: nearest training windows, ranked by BM25 (default) or the model's embeddings
  (`glassgpt trace-knn`), over knn_store.py (windows embedded by the model, with BM25), knn_search.py
  (exact / faiss) and knn_rank.py (the two signals, fused; `explain`)
- neurons.py: MLP neuron traces, contrasted and ablated (`glassgpt trace-neurons`), over
  neuron_record.py (recording, ablating, the baseline); neuron_card.py is `glassgpt neuron`

Each saves its index with glassgpt.artifacts' `save_artifact` and opens it with `open_artifact`.
"""
