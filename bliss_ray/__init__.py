"""bliss_ray: BLISS bilevel influence-scoring data selection for LLM pretraining, on Ray.

The package is split in two layers (a test enforces it):

* math: ``models``, ``data``, ``train``, ``bilevel``, ``selection``, ``scoring``, ``flops``, ``evaluation``,
  ``report``, ``mates`` and ``config`` are pure PyTorch / NumPy / pyarrow and never import Ray;
* orchestration: ``stages``, ``pipeline``, ``sweep`` and ``cli`` adapt Ray Data / Train / Tune to the math.

Start with ``bliss-ray run experiments/demo.yaml`` (see README.md).
"""

__version__ = "0.1.0"
