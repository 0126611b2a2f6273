"""Pipeline parallelism for variable-size graphs (see ``engine.py`` for the executor)."""
