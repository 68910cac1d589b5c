"""Ray job entrypoints: ``python -m jobs.<name> --config FILE [--set section.key=value ...]``.

Each file only parses arguments, loads the config and calls the pipeline.
"""
