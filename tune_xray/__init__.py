"""tune_xray: Ray Tune + Optuna + MLflow hyperparameter search for chest X-ray classification."""

import warnings

# MLflow warns of its own chat-agent type hints each time mlflow.pyfunc is imported (every command, --help too)
warnings.filterwarnings("ignore", message=r".*Any type hint is inferred as AnyType", category=UserWarning)
