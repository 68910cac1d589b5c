"""faceaudit: audit a face-image collection on Ray.

Stages (one module each, one public ``run(cfg)`` entry): ingest, train, extract, cluster,
classify, explain, report. :mod:`pipeline.run` chains them; :mod:`pipeline.config` is the one
typed config; :mod:`pipeline.storage` reaches local disk and S3; :mod:`pipeline.tables` names
the tables under a run's output root.
"""

__version__ = "0.1.0"
