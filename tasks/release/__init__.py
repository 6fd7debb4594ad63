"""After evaluation: the gate verdict, the MLflow registry (pyfunc model, model card) and lineage."""
