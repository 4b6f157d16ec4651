"""The registered ensemble's model code (MLflow models-from-code): the model is this file and the package's code
beside it, not a CloudPickle of an object — it loads with any Python that has the published requirements."""

import mlflow.models

from tune_xray.serving import EnsembleModel

mlflow.models.set_model(EnsembleModel())
