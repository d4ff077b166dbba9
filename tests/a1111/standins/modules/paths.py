"""Stand-in for ``modules/paths.py`` (A1111 1.10): ``models_path``, the ``models`` folder (tests set it)."""

models_path = "models"
