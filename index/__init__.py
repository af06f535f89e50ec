"""Building and storing FAISS indexes of full-model embeddings, with their metadata."""
