"""The Ray Serve application: retriever -> ranker behind HTTP (see `serve/app.py`)."""
