"""Small Mixtral-architecture model trained in-lab: corpus and tokenizer pipeline (corpus.py)."""
