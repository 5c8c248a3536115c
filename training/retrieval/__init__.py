"""Next-item retrieval: the dense retriever (SASRec / HSTU, dense.py), the generative one (semantic IDs +
NEZHA, generative.py), their data (data.py), losses, the shared epoch loop (loop.py) and the pipeline that
chains them (pipeline.py). Plain PyTorch; see docs/models.md for what each model computes.
"""
