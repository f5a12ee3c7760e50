"The thin baseline of the serving benchmark: a minimal FastAPI app that calls `predict_proba` (no validation, no logging)."
import json, os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pandas as pd
import mlflow.sklearn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

model = mlflow.sklearn.load_model(os.environ["MODEL_URI"])
app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    X = pd.DataFrame([json.loads(await request.body())])
    return JSONResponse({"score": float(model.predict_proba(X)[0, 1])})
