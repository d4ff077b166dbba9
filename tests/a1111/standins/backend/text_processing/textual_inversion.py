"""Stand-in for Forge's ``backend/text_processing/textual_inversion.py``: ``Embedding(vec, name, step=None)`` (the
loader sets ``shape`` and ``vectors``) and ``EmbeddingDatabase(tokenizer, expected_shape=-1)`` with
``register_embedding(embedding)`` and ``register_embedding_by_name(embedding, name)`` (None removes). No tokenizer:
``word_embeddings`` (name -> embedding) is what the prompt lookup reads."""

from __future__ import annotations


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0


class EmbeddingDatabase:
    def __init__(self, tokenizer=None, expected_shape=-1):
        self.word_embeddings = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
            return None
        self.word_embeddings[name] = embedding
        return embedding
