"""Training the project's own long-context model: a corpus of Python source files with synthetic
retrieval tasks mixed in (`data`), and a seeded, resumable training loop that writes a Hugging
Face checkpoint the engines load (`train`)."""
