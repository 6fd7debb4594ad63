"""Pipeline stages: one module per stage, each a pure function, a thin Prefect task and a `__main__` for DVC."""
