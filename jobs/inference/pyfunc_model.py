"""The file MLflow runs to get the SALGL model ("models from code": nothing is unpickled on load).

MLflow copies it into the model folder at logging time and executes it when the model loads, after
putting the shipped packages on the path; see ``jobs.inference.pyfunc``.
"""

import mlflow

from jobs.inference.pyfunc import SalglModel

mlflow.models.set_model(SalglModel())
