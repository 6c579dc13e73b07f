"""MLflow "models from code" entry point: MLflow runs this file to build the pyfunc model.

flowray never imports it; `mlflow.pyfunc.log_model(python_model=<this path>)` stores it with the
model, so a logged flow holds code, config JSON and safetensors weights and no pickle.
"""

import mlflow.models

from pipeline.model.pyfunc import FlowPyfunc

mlflow.models.set_model(FlowPyfunc())
